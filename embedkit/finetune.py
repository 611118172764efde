"""``embedkit.finetune``: train a backbone (all of it, its last N blocks, or none) with a new head,
and keep the result as a new backbone that flows back through export, feature store and heads.

Inputs go through the inference preprocessing: the parent artifact's tokenizer and max length
(:class:`embedkit.text.TextTokenizer`), or its image preprocessing
(:class:`embedkit.image.ImageProcessor`) plus training augmentation (:mod:`embedkit.augment`).
Bad items (undecodable images, invalid text) are per-item records in ``failures``, excluded and
counted; bad labels and settings are typed errors before any training.

The loop is :mod:`embedkit.trainer`; checkpoints :mod:`embedkit.checkpoint`; the persisted
backbone :mod:`embedkit.tuned`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import (DatasetError, DeviceUnavailableError, ExportError, NonFiniteOutputError, OutputExistsError,
                     TrainingDivergedError, UsageError)

logger = logging.getLogger(__name__)

OBJECTIVES = ("classify", "contrastive")


@dataclass
class FinetuneResult:
    """What :func:`finetune` made.

    Attributes:
        backbone: the new backbone's name (resolves by name in later processes).
        digest: its exported artifact's sha256 (its feature-store namespace).
        parent: the parent backbone's name; ``parent_digest`` its artifact's sha256.
        history: one dict per epoch (``train_loss``, ``val_loss``, ``val_accuracy``, ``val_macro_f1``, ...).
        model: ``Pipeline([Embedder(backbone), head])`` predicting from raw items.
        model_path: where the model was saved (``out``), else None.
        failures: one record per excluded item (``index``, ``split``, ``code``, ``stage``, ``message``).
        classes: the label values, in the head's order.
        lineage: what the backbone's manifest records (parent, data fingerprint, hyperparameters, metrics).
        seconds: wall time of the whole call.
    """

    backbone: str
    digest: str
    parent: str
    parent_digest: str
    history: list[dict[str, Any]]
    model: Any
    model_path: Path | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    classes: list[Any] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# -- input checks ---------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def check_labels(labels: Sequence[Any], n: int, what: str = "items") -> np.ndarray:
    """``labels`` as an object array, refusing another length and missing values.

    Raises:
        DatasetError: not one label per item; a None / NaN / empty label (the message names
            how many and the first indices); labels of mixed types (1 and "1", True and 1);
            continuous values (a float that is not a whole number).
    """
    if isinstance(labels, (str, bytes)):
        raise DatasetError("labels must be a sequence with one label per item, not a single string")
    labels = list(labels)
    if len(labels) != n:
        raise DatasetError(f"{len(labels)} labels for {n} {what}: give exactly one label per item")
    bad = [i for i, v in enumerate(labels) if _missing(v)]
    if bad:
        raise DatasetError(f"{len(bad)} of {n} labels are missing (None, NaN or empty), e.g. at index "
                           f"{', '.join(map(str, bad[:5]))}; label every item or leave those items out")
    kinds = {type(v.item() if isinstance(v, np.generic) else v).__name__ for v in labels}
    numbers_ = {"int", "float"}
    if len(kinds - numbers_) > 1 or (kinds - numbers_ and kinds & numbers_):  # 1 and "1", True and 1: one class?
        raise DatasetError(f"labels mix types ({', '.join(sorted(kinds))}); use one type, e.g. all strings")
    fractional = [v for v in labels if isinstance(v, (float, np.floating)) and not float(v).is_integer()]
    if fractional:
        raise DatasetError(f"labels hold continuous values (e.g. {fractional[0]!r}); a classifier needs class labels "
                           "such as strings or integers")
    out = np.empty(n, dtype=object)
    out[:] = [v.item() if isinstance(v, np.generic) else v for v in labels]
    return out


def _positive(name: str, value: Any, kind: type = int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not value > 0 or (kind is float and not math.isfinite(value)):
        raise UsageError(f"{name} must be a positive {'number' if kind is float else 'integer'}, got {value!r}")


def check_settings(*, objective: str, epochs: Any, batch_size: Any, lr: Any, head_lr: Any, layer_decay: Any,
                   weight_decay: Any, warmup: Any, max_grad_norm: Any, validation: Any, patience: Any,
                   class_weight: Any, device: str, checkpoint_every: Any, resume: bool,
                   checkpoint_dir: Any, seed: Any = 0) -> str:
    """Refuse bad settings before any work; returns the device to train on.

    Raises:
        UsageError: a value out of range (the message names it and what is allowed).
        DeviceUnavailableError: ``device="cuda"`` without a CUDA device.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        _positive(name, value)
    _positive("checkpoint_every", checkpoint_every, allow_none=True)
    _positive("patience", patience, allow_none=True)
    for name, value in (("lr", lr), ("head_lr", head_lr)):
        _positive(name, value, float)
    _positive("max_grad_norm", max_grad_norm, float, allow_none=True)
    if layer_decay is not None and not (isinstance(layer_decay, (int, float)) and 0 < layer_decay <= 1):
        raise UsageError(f"layer_decay must be None or a number in (0, 1], got {layer_decay!r}")
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise UsageError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if not isinstance(warmup, (int, float)) or isinstance(warmup, bool) or not 0 <= warmup or (
            isinstance(warmup, float) and warmup >= 1 and not warmup.is_integer()):
        raise UsageError(f"warmup must be a fraction of the steps in [0, 1) or a whole number of steps, got {warmup!r}")
    if not (validation is None or isinstance(validation, tuple) and len(validation) == 2
            or isinstance(validation, (int, float)) and not isinstance(validation, bool) and 0 <= validation < 1):
        raise UsageError(f"validation must be a fraction in [0, 1), (items, labels), or None, got {validation!r}")
    if patience and not validation:
        raise UsageError("patience (early stopping) needs validation data: give validation=0.1 or (items, labels)")
    if class_weight is not None and class_weight != "balanced" and not isinstance(class_weight, dict):
        raise UsageError(f"class_weight must be None, 'balanced' or a dict label -> weight, got {class_weight!r}")
    if isinstance(class_weight, dict):  # a zero, negative or NaN weight trains to NaN weights, found only at export
        bad = {k: w for k, w in class_weight.items() if not isinstance(w, numbers.Real) or isinstance(w, bool)
               or not math.isfinite(w) or not w > 0}
        if bad:
            raise UsageError(f"class_weight weights must be positive finite numbers, got {bad!r}; "
                             "give each listed label a weight > 0 (1 is unweighted) or use 'balanced'")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise UsageError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if (resume or checkpoint_every) and checkpoint_dir is None:
        raise UsageError("resume and checkpoint_every need a checkpoint_dir")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device={device!r} but torch sees no CUDA device; use device='cpu'")
    elif device != "cpu":
        raise UsageError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return device


def _check_objective_options(objective: str, options: dict[str, Any], **settings: Any) -> None:
    """Refuse, before any work, an option the objective does not take and a setting it would ignore.

    Raises:
        UsageError: ``classify`` with options, ``contrastive`` with another option than
            ``iterations``, ``loss`` and ``scale`` or a bad value of one, or ``contrastive`` with ``patience`` or
            ``layer_decay`` (it has no validation-driven early stop nor per-block learning rates;
            ``head_lr``, which always has a value, is classify's and unused by contrastive).
    """
    if objective == "classify":
        if options:
            raise UsageError(f"objective='classify' takes no options {sorted(options)}; "
                             "iterations is an option of objective='contrastive'")
        return
    from .contrastive import OPTIONS, check_options

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(f"objective='contrastive' takes the options {', '.join(OPTIONS)}, got {unknown}")
    check_options(**options)
    ignored = [k for k, v in settings.items() if v is not None]
    if ignored:
        raise UsageError(f"objective='contrastive' does not use {', '.join(ignored)} (its head is a LogisticRegression "
                         "fitted after the body is tuned): leave them out, or use objective='classify'")


def _check_finite(module: Any, data: Any, index: np.ndarray) -> None:
    """Refuse a tuned body whose output on a few training items is NaN or infinite (weights that
    overflow stay finite themselves: the export's probes were the first to see it).

    Raises:
        TrainingDivergedError: such an output.
    """
    import torch

    module.eval()
    with torch.no_grad():
        out = module(*data.batch(index, None))
    if not bool(torch.isfinite(out.float()).all()):
        raise TrainingDivergedError("the tuned backbone's output on training items")


def _class_weights(class_weight: Any, classes: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    if class_weight is None:
        return None
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    if class_weight == "balanced":  # scikit-learn's rule: n / (classes * count)
        return (len(y) / (len(classes) * np.maximum(counts, 1))).astype(np.float32)
    unknown = [k for k in class_weight if k not in set(classes.tolist())]
    if unknown:
        raise UsageError(f"class_weight names labels that are not in the data: {unknown[:5]}")
    return np.asarray([float(class_weight.get(c, 1.0)) for c in classes], dtype=np.float32)


# -- the head as a scikit-learn estimator -----------------------------------------------------
def sklearn_head(head: Any, classes: np.ndarray) -> Any:
    """The trained linear head as a fitted :class:`~sklearn.linear_model.LogisticRegression` with
    the same decisions and (softmax) probabilities: ``coef_ = W * scale``, ``intercept_ = b``; two
    classes keep one row, the difference of theirs (softmax of two logits = sigmoid of their difference)."""
    from sklearn.linear_model import LogisticRegression

    weight = (head.linear.weight.detach().double() * head.scale.detach().double()).cpu().numpy()
    bias = head.linear.bias.detach().double().cpu().numpy()
    if len(classes) == 2:
        weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]
    clf = LogisticRegression()
    clf.classes_ = np.asarray(classes)
    clf.coef_, clf.intercept_ = weight, bias
    clf.n_features_in_ = weight.shape[1]
    clf.n_iter_ = np.asarray([0], dtype=np.int32)
    return clf


def _contrastive(module: Any, plan: Any, preprocess: Any, texts: list[str], y: np.ndarray, val: Any,
                 settings: Any, progress: Any, options: dict[str, Any],
                 class_weight: Any = None) -> tuple[Any, list[dict[str, Any]]]:
    """SetFit's recipe (:mod:`embedkit.contrastive`), then a LogisticRegression on the tuned embeddings."""
    try:
        from .contrastive import encode, finetune_contrastive, text_tokenizer
    except ImportError as exc:
        raise UsageError(f"objective='contrastive' is not available in this build ({exc}); use objective='classify'") from None
    from sklearn.linear_model import LogisticRegression

    tokenize = text_tokenizer(preprocess)
    history = finetune_contrastive(
        module, tokenize, texts, y.tolist(), epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
        seed=settings.seed, weight_decay=settings.weight_decay, warmup=settings.warmup,
        max_grad_norm=settings.max_grad_norm or 0.0, device=settings.device, train_mode=plan.train,
        progress=(lambda done, total: progress(done, total, {})) if progress else None, **options)
    module.eval()
    clf = LogisticRegression(max_iter=2000, random_state=settings.seed, class_weight=class_weight)
    clf.fit(encode(module, tokenize, texts), y)
    if val is not None:
        v_texts, v_y = val
        acc = float((clf.predict(encode(module, tokenize, v_texts)) == v_y).mean())
        history[-1]["val_accuracy"] = acc
    return clf, history


# -- the public function --------------------------------------------------------------------
def finetune(backbone: Any, items: Any, labels: Sequence[Any], *, unfreeze: str = "last:2",
             objective: str = "classify", epochs: int = 3, batch_size: int = 32, lr: float = 2e-5,
             head_lr: float = 1e-3, layer_decay: float | None = None, weight_decay: float = 0.01,
             warmup: float = 0.1, max_grad_norm: float | None = 1.0, validation: Any = 0.1,
             patience: int | None = None, class_weight: Any = None, seed: int = 0, device: str = "cpu",
             augment: bool = True, checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
             resume: bool = False, name: str | None = None, store: Any = None, out: str | Path | None = None,
             train_batchnorm: bool = False,
             progress: Callable[[int, int, dict[str, Any]], None] | None = None,
             **objective_options: Any) -> FinetuneResult:
    """Fine-tune ``backbone`` on labelled raw items; the result is a new backbone and a classifier.

    Args:
        backbone: a registered name or spec, or a :class:`~embedkit.Backbone` (registered, so
            that later processes can rebuild it).
        items: texts (str or UTF-8 bytes) or images (paths, bytes, PIL images, (H, W[, C]) arrays),
            or a source :func:`embedkit.sources.iter_items` reads (a folder, a ``.txt``, a table).
        labels: one label per item (str or int), no missing values.
        unfreeze: ``head`` | ``last:N`` | ``all`` (:mod:`embedkit.blocks`).
        objective: ``classify`` (cross-entropy with a linear head) or ``contrastive`` (SetFit's
            recipe, texts only). Its options go in ``objective_options``: ``iterations`` (pairs,
            or anchors, per item), ``loss`` (``cosine``: SetFit's pairs; ``in-batch``: in-batch
            negatives, ``batch_size`` classes per batch) and ``scale`` (in-batch: 20), as
            :func:`embedkit.contrastive.finetune_contrastive` takes them.
        epochs, batch_size: passes over the training items; items per optimiser step.
        lr, head_lr: peak learning rates of the backbone and of the head.
        layer_decay: lr of a block at depth d (0 = last) is ``lr * layer_decay ** d``; None: off.
        weight_decay: AdamW's, on matrices (not biases and norms).
        warmup: fraction of the steps (or a number of steps) of linear warm-up before cosine decay.
        max_grad_norm: gradient clipping (None: off).
        validation: a fraction held out (stratified), ``(items, labels)``, or None / 0 (none).
        patience: stop after this many epochs without a better validation accuracy (the best
            epoch's weights are kept whenever there is validation).
        class_weight: None, ``"balanced"``, or a dict label -> weight (> 0) of the loss (contrastive:
            of its LogisticRegression head).
        seed: everything random (split, init, order, augmentation, dropout) follows it; the same
            seed gives the same weights on CPU.
        device: ``cpu``, ``cuda[:N]`` (automatic mixed precision) or ``auto``.
        augment: images: random resized crop and horizontal flip while training.
        checkpoint_dir: folder for checkpoints and ``metrics.json`` (each epoch, and every
            ``checkpoint_every`` steps); ``resume`` continues from its last checkpoint.
        name: the new backbone's name (default ``<parent>+ft-<hash of its weights>``).
        store: the model store (default ``$EMBEDKIT_HOME`` / user cache).
        out: folder to save the classifier in (:func:`embedkit.save`; loads with :func:`embedkit.load`).
        progress: ``progress(step, total_steps, info)`` after each step and epoch (``info``: loss,
            epoch, validation accuracy).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        DatasetError: labels of another length, missing (None/NaN/empty) labels, a single class
            (also after bad items are excluded).
        InvalidUnfreezeError: a bad ``unfreeze`` or ``last:N`` beyond the backbone's blocks.
        NoBlocksError: ``last:N`` on a backbone without blocks.
        UsageError: a setting out of range, an option or setting the objective does not use.
        CheckpointError: ``resume`` from another run's folder.
        TrainingDivergedError: the loss or a trained weight became NaN / infinite (no backbone saved).
        OutputError: ``out`` or ``checkpoint_dir`` refused (:func:`embedkit.outputs.check_output`).
    """
    import torch

    from . import checkpoint, trainer, tuned
    from .artifacts import ModelStore
    from .backbone import NAME_PATTERN, Backbone
    from .blocks import parse_unfreeze, plan_freeze
    from .exporter import export, export_key
    from .outputs import check_output
    from .plugins import get_backbone
    from .training import check_classes, holdout_split
    from .trainset import Joined, data_fingerprint, items_of, prepare

    started = time.perf_counter()
    device = check_settings(objective=objective, epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr,
                            layer_decay=layer_decay, weight_decay=weight_decay, warmup=warmup,
                            max_grad_norm=max_grad_norm, validation=validation, patience=patience,
                            class_weight=class_weight, device=device, checkpoint_every=checkpoint_every,
                            resume=resume, checkpoint_dir=checkpoint_dir, seed=seed)
    for flag, value in (("augment", augment), ("resume", resume), ("train_batchnorm", train_batchnorm)):
        if not isinstance(value, (bool, np.bool_)):  # "false" would be taken as True
            raise UsageError(f"{flag} must be True or False, got {value!r}")
    spec = parse_unfreeze(unfreeze)
    models = store if isinstance(store, ModelStore) else ModelStore(store)
    if name is not None and (not isinstance(name, str) or not NAME_PATTERN.match(name)):
        raise UsageError(f"name must match {NAME_PATTERN.pattern}, got {name!r}")
    if name is not None and tuned.find(name, models.root) is not None:
        raise OutputExistsError(f"a fine-tuned backbone {name!r} is already in the model store {models.root}; "
                                "choose another name")
    parent = get_backbone(backbone) if isinstance(backbone, str) else backbone
    if not isinstance(parent, Backbone):
        raise UsageError(f"backbone must be a name, spec or embedkit.Backbone, got {type(parent).__name__}")
    if objective == "contrastive" and parent.modality != "text":
        raise UsageError("objective='contrastive' (SetFit) is for text backbones; use objective='classify'")
    if objective == "contrastive" and checkpoint_dir is not None:
        raise UsageError("checkpoint_dir / resume are for objective='classify' (a contrastive run is short: rerun it)")
    _check_objective_options(objective, objective_options, patience=patience, layer_decay=layer_decay)
    payloads, ids, sources = items_of(items, parent.modality)
    y_raw = check_labels(labels, len(payloads))
    check_classes(y_raw)
    if isinstance(validation, tuple):
        v_payloads, v_ids, _ = items_of(validation[0], parent.modality)
        v_raw = check_labels(validation[1], len(v_payloads), "validation items")
        if not v_payloads:
            raise DatasetError("validation=(items, labels) holds no items; give validation items, a fraction such as "
                               "0.1, or None for no validation")
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    outputs = [p for p in (items,) if isinstance(p, (str, Path))]
    if ckpt is not None:
        _check_checkpoints(ckpt, outputs)
    if out is not None:
        check_output(out, "model", inputs=outputs)
    if parent.onnx is not None:
        raise UsageError(f"backbone {parent.name!r} is ONNX-only: it has no torch module to fine-tune")
    torch.manual_seed(seed)
    module = parent.build()
    plan = plan_freeze(parent, module, spec, train_batchnorm=train_batchnorm)
    if layer_decay is not None and spec.kind == "all" and not plan.blocks:  # every depth 0: it would do nothing
        raise UsageError(f"layer_decay needs the backbone's blocks, and {parent.name!r} has none (declared or "
                         "inferred): leave layer_decay out, or declare its blocks (Backbone(..., blocks=...))")
    parent_artifact = export(parent if not isinstance(backbone, str) else backbone, models)
    preprocess = parent_artifact.preprocess

    # items through the inference preprocessing; bad ones become records
    data, kept, failures = prepare(parent.modality, payloads, preprocess, augment, device, "train")
    good = np.asarray(kept, dtype=int)
    classes_raw, _ = check_classes(y_raw[good]) if len(good) else (None, None)
    if not len(good):
        raise DatasetError(f"none of the {len(payloads)} items could be used: {failures[0]['message']}")
    classes = np.asarray(sorted(classes_raw.tolist()), dtype=object)
    lookup = {c: k for k, c in enumerate(classes.tolist())}
    y_all = np.asarray([lookup.get(v, -1) for v in y_raw], dtype=np.int64)
    notes: list[str] = []
    if isinstance(validation, tuple):
        v_data, v_kept, v_fail = prepare(parent.modality, v_payloads, preprocess, False, device, "validation")
        if not v_kept:  # training on with no validation would drop early stopping and best-epoch silently
            raise DatasetError(f"none of the {len(v_payloads)} validation items could be used: "
                               f"{v_fail[0]['message']}; fix them, or give validation=None")
        failures += v_fail
        unknown = sorted({str(v) for v in v_raw if v not in lookup})
        if unknown:
            raise DatasetError(f"validation labels not among the training labels: {unknown[:5]}")
        data = Joined(data, v_data, len(payloads))
        train_idx = good
        val_idx = len(payloads) + np.asarray(v_kept, dtype=int)
        y_all = np.concatenate([y_all, np.asarray([lookup[v] for v in v_raw], dtype=np.int64)])
    elif validation:
        tr, va, notes = holdout_split(y_raw[good], float(validation), seed)
        train_idx, val_idx = good[tr], good[va]
    else:
        train_idx, val_idx = good, None
    for note in notes:
        logger.info("validation split: %s", note)
    if failures:
        logger.warning("%d items excluded (could not be read or preprocessed); see result.failures", len(failures))
    weights = _class_weights(class_weight, classes, y_all[train_idx])
    hyper = {"objective": objective, "unfreeze": str(spec), "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "head_lr": head_lr, "layer_decay": layer_decay, "weight_decay": weight_decay, "warmup": warmup,
             "max_grad_norm": max_grad_norm, "validation": validation if not isinstance(validation, tuple) else "given",
             "patience": patience, "class_weight": class_weight, "seed": seed, "augment": augment,
             "train_batchnorm": train_batchnorm, **objective_options}
    fingerprint = data_fingerprint([ids[i] for i in good], [y_raw[i] for i in good])
    settings = trainer.Settings(epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, layer_decay=layer_decay,
                                weight_decay=weight_decay, warmup=warmup, max_grad_norm=max_grad_norm,
                                patience=patience, seed=seed, device=device, checkpoint_every=checkpoint_every)
    if objective == "contrastive":
        texts = [payloads[i] for i in train_idx]
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        val = None
        if val_idx is not None:
            src = v_payloads if isinstance(validation, tuple) else payloads
            off = len(payloads) if isinstance(validation, tuple) else 0
            val = ([src[i - off] for i in val_idx], classes[y_all[val_idx]])
        clf, history = _contrastive(module, plan, preprocess, texts, classes[y_all[train_idx]], val, settings, progress,
                                    objective_options, class_weight)
    else:
        resume_state = None
        with contextlib.ExitStack() as stack:
            if ckpt is not None:
                _own_checkpoints(stack, ckpt)
                config = {"parent": parent_artifact.digest, "data": fingerprint, "hyperparameters": hyper,
                          "device": device}
                resume_state = checkpoint.start(ckpt, config, resume)
            head, history = trainer.train(module, plan, data, y_all, train_idx, val_idx, len(classes), parent.dim,
                                          settings, weights, ckpt, resume_state, progress)
        clf = sklearn_head(head.cpu(), classes)
    _check_finite(module, data, train_idx[:8])
    module.cpu().eval()
    from .persistence import _portable_spec

    parent_spec = _portable_spec(backbone) if isinstance(backbone, str) else parent.name
    lineage = {
        "parent": {"name": parent.name, "spec": parent_spec,
                   "digest": parent_artifact.digest, "export_key": export_key(parent)},
        "data": {"fingerprint": fingerprint, "items": int(len(good)), "excluded": len(failures),
                 "classes": [str(c) for c in classes]},
        "hyperparameters": hyper, "metrics": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    new, created = tuned.persist(models.root, name or "", parent, parent_spec, module, lineage,
                                 user_named=name is not None)
    try:
        artifact = export(new, models)
    except ExportError as exc:  # not left in the store as a backbone that lists but never exports
        if created:
            tuned.discard(new)
        if isinstance(exc, NonFiniteOutputError):
            raise TrainingDivergedError("the tuned backbone's output on the export's probes",
                                        "lr" if objective == "contrastive" else "lr / head_lr") from exc
        raise
    from sklearn.pipeline import Pipeline

    from .embedder import Embedder

    model = Pipeline([("embed", Embedder(new.name, store=str(models.root)).fit()), ("head", clf)])
    saved = None
    if out is not None:
        from .persistence import save

        saved = save(model, out)
    return FinetuneResult(backbone=new.name, digest=artifact.digest, parent=parent.name,
                          parent_digest=parent_artifact.digest, history=history, model=model, model_path=saved,
                          failures=failures, classes=classes.tolist(), lineage=lineage,
                          seconds=round(time.perf_counter() - started, 3))


def _own_checkpoints(stack: contextlib.ExitStack, folder: Path) -> None:
    """Hold ``folder``'s writer lock until ``stack`` closes: two runs never write one checkpoint folder.

    Raises:
        OutputError: another live run holds it.
    """
    from .errors import OutputError
    from .locks import owned

    folder.mkdir(exist_ok=True)
    if not stack.enter_context(owned(folder / "checkpoint.lock")):
        raise OutputError(f"another fine-tune is writing the checkpoints in {folder} now; wait for it to end, or "
                          "choose another checkpoint_dir (--out)")


def _check_checkpoints(folder: Path, inputs: list[Any]) -> None:
    """The checkpoint folder: new, empty, or an earlier checkpoint folder (its marker's kind)."""
    from .outputs import check_output

    check_output(folder, "checkpoints", inputs=inputs)
