"""``embedkit.finetune``: train a backbone (all of it, its last N blocks, or none) with a new head,
and keep the result as a new backbone that flows back through export, feature store and heads.

Inputs go through the inference preprocessing: the parent artifact's tokenizer and max length
(:class:`embedkit.inputs.text.TextTokenizer`), or its image preprocessing
(:class:`embedkit.inputs.image.ImageProcessor`) plus training augmentation (:mod:`embedkit.finetuning.augment`).
Bad items (undecodable images, invalid text) are per-item records in ``failures``, excluded and
counted; bad labels and settings are typed errors before any training.

:func:`finetune` is four steps: :func:`validate` (every check that needs no model),
:func:`prepare` (the module, its freeze plan, the data and its split), :func:`train` (the
objective through :func:`embedkit.finetuning.loop.run`) and :func:`persist` (the new backbone,
its export and the classifier). Checks are :mod:`.checks`; objectives :mod:`.objectives`;
checkpoints :mod:`.checkpoints`; the tuned body's outputs checked after training :mod:`.health`;
the persisted backbone and its name :mod:`embedkit.models.finetuned`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..backbones.blocks import plan_freeze
from ..embedder import Embedder
from ..errors import DatasetError, ExportError, NonFiniteOutputError, OutputError, TrainingDivergedError, UsageError
from ..fs.locks import owned
from ..heads.persistence import portable_spec, save
from ..heads.training import check_classes, holdout_split
from ..models import finetuned as tuned
from ..models.exporter import export, export_key
from . import checkpoints as checkpoint
from . import loop
from .checks import OBJECTIVES, Job, Options, check_labels, class_weights, plain, validate
from .contrastive import encode, finetune_contrastive, text_tokenizer
from .dataset import Joined, data_fingerprint
from .dataset import prepare as prepare_items
from .health import SAMPLE, chance_level, check_outputs, mean_cosine, outputs
from .objectives import Classify, sklearn_head

__all__ = ["OBJECTIVES", "FinetuneResult", "Options", "check_labels", "finetune", "prepare", "persist",
           "sklearn_head", "train", "validate"]

logger = logging.getLogger(__name__)


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
        lineage: what the backbone's manifest records (parent, data fingerprint, hyperparameters, metrics,
            ``warnings``).
        warnings: what looks wrong with a result that was still kept (validation accuracy at chance
            level), also logged and recorded in the lineage.
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
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Prepared:
    """What :func:`prepare` made: the module to train and the data, split, in the head's class order."""

    module: Any
    plan: Any
    artifact: Any  # the parent's exported artifact
    data: Any
    failures: list[dict[str, Any]]
    classes: np.ndarray
    y: np.ndarray  # class codes of every item (given validation items after the training items)
    train_idx: np.ndarray
    val_idx: np.ndarray | None
    good: np.ndarray  # the training items that could be used
    weights: np.ndarray | None
    fingerprint: str
    hyper: dict[str, Any]
    validation_fingerprint: str | None = None  # of the given validation items and labels
    warnings: list[str] = field(default_factory=list)


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
            or a source :func:`embedkit.inputs.sources.iter_items` reads (a folder, a ``.txt``, a table).
        labels: one label per item (str or int), no missing values.
        unfreeze: ``head`` | ``last:N`` | ``all`` (:mod:`embedkit.backbones.blocks`).
        objective: ``classify`` (cross-entropy with a linear head) or ``contrastive`` (SetFit's
            recipe, texts only). Its options go in ``objective_options``: ``iterations`` (pairs,
            or anchors, per item), ``loss`` (``cosine``: SetFit's pairs; ``in-batch``: in-batch
            negatives, ``batch_size`` classes per batch) and ``scale`` (in-batch: 20), as
            :func:`embedkit.finetuning.contrastive.finetune_contrastive` takes them.
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
        name: the new backbone's name. Default ``<parent>+ft-<8 hex digits>``: a hash of the tuned
            weights and of the run's identity (parent digest, training and validation data
            fingerprints, hyperparameters with the seed, device; :func:`embedkit.models.finetuned.default_name`),
            so two different runs never share a name or a record (a ``unfreeze="head"`` run keeps
            the parent's body, whatever its seed or data) and an identical rerun gets the same name.
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
        CheckpointError: ``resume`` from another run's folder, or from a checkpoint file that fails
            its checksum or was written by another run (the message names the file).
        TrainingDivergedError: the loss, a trained weight or the tuned body's output became NaN /
            infinite; :class:`~embedkit.errors.TrainingCollapsedError`: its outputs collapsed to one
            vector (no backbone saved in either case).
        TrainingItemLostError: a training image could not be read again during the run.
        OutputError: ``out`` or ``checkpoint_dir`` refused (:func:`embedkit.fs.outputs.check_output`), or a
            model store that cannot be written (before training).
        OutputExistsError: ``name`` held by a registered backbone, other artifacts, or another run's
            fine-tune (a ``resume`` of the run that made it finishes it instead).
    """
    started = time.perf_counter()
    # numpy numbers (np.int64 epochs, np.float32 lr) are the Python numbers they hold
    epochs, batch_size, lr, head_lr, layer_decay, weight_decay, warmup, max_grad_norm, patience, seed, \
        checkpoint_every = map(plain, (epochs, batch_size, lr, head_lr, layer_decay, weight_decay, warmup,
                                      max_grad_norm, patience, seed, checkpoint_every))
    validation = plain(validation)
    options = Options(unfreeze=unfreeze, objective=objective, epochs=epochs, batch_size=batch_size, lr=lr,
                      head_lr=head_lr, layer_decay=layer_decay, weight_decay=weight_decay, warmup=warmup,
                      max_grad_norm=max_grad_norm, validation=validation, patience=patience, class_weight=class_weight,
                      seed=seed, device=device, augment=augment, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, resume=resume, name=name, store=store, out=out,
                      train_batchnorm=train_batchnorm, objective_options=objective_options)
    job = validate(backbone, items, labels, options)
    prepared = prepare(job, options)
    clf, history = train(job, prepared, options, progress)
    result = persist(job, prepared, options, clf, history)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


# -- prepare: the module, its freeze plan, the data and its split --------------------------------
def prepare(job: Job, o: Options) -> Prepared:
    """Build the parent's module and freeze plan, export the parent, preprocess and split the items.

    Raises:
        UsageError: ``layer_decay`` on a backbone without blocks.
        DatasetError: no usable item, a single class left, bad given validation data.
    """
    import torch

    torch.manual_seed(o.seed)
    module = job.parent.build()
    plan = plan_freeze(job.parent, module, job.spec, train_batchnorm=o.train_batchnorm)
    if o.layer_decay is not None and job.spec.kind == "all" and not plan.blocks:  # every depth 0: it would do nothing
        raise UsageError(f"layer_decay needs the backbone's blocks, and {job.parent.name!r} has none (declared or "
                         "inferred): leave layer_decay out, or declare its blocks (Backbone(..., blocks=...))")
    artifact = export(job.parent if not isinstance(job.backbone, str) else job.backbone, job.models)
    # items through the inference preprocessing; bad ones become records
    data, kept, failures = prepare_items(job.parent.modality, job.payloads, artifact.preprocess, o.augment,
                                         job.device, "train")
    good = np.asarray(kept, dtype=int)
    if not len(good):
        raise DatasetError(f"none of the {len(job.payloads)} items could be used: {failures[0]['message']}")
    classes_raw, _ = check_classes(job.y_raw[good])
    classes = np.asarray(sorted(classes_raw.tolist()), dtype=object)
    lookup = {c: k for k, c in enumerate(classes.tolist())}
    y = np.asarray([lookup.get(v, -1) for v in job.y_raw], dtype=np.int64)
    data, y, train_idx, val_idx = _split(job, o, data, y, good, lookup, artifact.preprocess, failures)
    if failures:
        logger.warning("%d items excluded (could not be read or preprocessed); see result.failures", len(failures))
    return Prepared(module=module, plan=plan, artifact=artifact, data=data, failures=failures, classes=classes, y=y,
                    train_idx=train_idx, val_idx=val_idx, good=good,
                    weights=class_weights(o.class_weight, classes, y[train_idx]),
                    fingerprint=data_fingerprint([job.ids[i] for i in good], [job.y_raw[i] for i in good]),
                    hyper=o.hyperparameters(str(job.spec)),
                    validation_fingerprint=data_fingerprint(job.v_ids, list(job.v_raw))
                    if job.v_ids is not None and job.v_raw is not None else None)


def _split(job: Job, o: Options, data: Any, y: np.ndarray, good: np.ndarray, lookup: dict[Any, int],
           preprocess: Any, failures: list[dict[str, Any]]) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(data, y, train_idx, val_idx)``: given validation items joined after the training items, a
    stratified held-out fraction, or no validation (``failures`` takes the validation items' records)."""
    if job.v_payloads is not None and job.v_raw is not None:
        v_data, v_kept, v_fail = prepare_items(job.parent.modality, job.v_payloads, preprocess, False, job.device,
                                               "validation")
        if not v_kept:  # training on with no validation would drop early stopping and best-epoch silently
            raise DatasetError(f"none of the {len(job.v_payloads)} validation items could be used: "
                               f"{v_fail[0]['message']}; fix them, or give validation=None")
        failures += v_fail
        unknown = sorted({str(v) for v in job.v_raw if v not in lookup})
        if unknown:
            raise DatasetError(f"validation labels not among the training labels: {unknown[:5]}")
        n = len(job.payloads)
        y = np.concatenate([y, np.asarray([lookup[v] for v in job.v_raw], dtype=np.int64)])
        return Joined(data, v_data, n), y, good, n + np.asarray(v_kept, dtype=int)
    if o.validation:
        tr, va, notes = holdout_split(job.y_raw[good], float(o.validation), o.seed)
        for note in notes:
            logger.info("validation split: %s", note)
        return data, y, good[tr], good[va]
    return data, y, good, None


# -- train: the objective through the one loop ------------------------------------------------
def train(job: Job, p: Prepared, o: Options, progress: loop.Progress | None) -> tuple[Any, list[dict[str, Any]]]:
    """Tune ``p.module`` in place with ``o.objective``; returns ``(fitted scikit-learn head, history)``.

    Raises:
        TrainingDivergedError: the loss, a weight or the tuned module's output became NaN / infinite.
        CheckpointError, OutputError: ``resume`` from another run's folder; a folder in use.
    """
    settings = o.settings(job.device)
    sample = p.train_idx[:SAMPLE]
    p.module.to(job.device)  # where the data's batches are
    before = mean_cosine(outputs(p.module, p.data, sample))  # the parent's, on the same items
    if o.objective == "contrastive":
        clf, history = _contrastive(job, p, o, settings, progress)
    else:
        clf, history = _classify(job, p, o, settings, progress)
    check_outputs(p.module, p.data, sample, before, "lr" if o.objective == "contrastive" else "lr / head_lr")
    p.warnings += chance_level(p.y, p.val_idx, len(p.classes), history)
    for warning in p.warnings:
        logger.warning("%s", warning)
    p.module.cpu().eval()
    return clf, history


def _classify(job: Job, p: Prepared, o: Options, settings: loop.Settings,
              progress: loop.Progress | None) -> tuple[Any, list[dict[str, Any]]]:
    """Cross-entropy with a linear head (checkpointed and resumable); the head as a LogisticRegression."""
    objective = Classify(p.plan, p.data, p.y, p.train_idx, p.val_idx, len(p.classes), job.parent.dim, settings,
                         p.weights)
    resume_state, run_id = None, ""
    with contextlib.ExitStack() as stack:
        if job.checkpoints is not None:
            _own_checkpoints(stack, job.checkpoints)
            config = {"parent": p.artifact.digest, "data": p.fingerprint, "hyperparameters": p.hyper,
                      "device": job.device}
            if p.validation_fingerprint is not None:  # given validation data is part of the run's identity
                config["validation"] = p.validation_fingerprint
            resume_state = checkpoint.start(job.checkpoints, config, o.resume)
            run_id = checkpoint.identity(config)
        history = loop.run(objective, p.module, settings, job.checkpoints, resume_state, progress, run_id)
    return sklearn_head(objective.head.cpu(), p.classes), history


def _contrastive(job: Job, p: Prepared, o: Options, settings: loop.Settings,
                 progress: loop.Progress | None) -> tuple[Any, list[dict[str, Any]]]:
    """SetFit's recipe (:mod:`.contrastive`), then a LogisticRegression on the tuned embeddings."""
    from sklearn.linear_model import LogisticRegression

    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in (job.payloads[i] for i in p.train_idx)]
    y = p.classes[p.y[p.train_idx]]
    tokenize = text_tokenizer(p.artifact.preprocess)
    history = finetune_contrastive(
        p.module, tokenize, texts, y.tolist(), epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
        seed=settings.seed, weight_decay=settings.weight_decay, warmup=settings.warmup,
        max_grad_norm=settings.max_grad_norm or 0.0, device=settings.device, train_mode=p.plan.train,
        progress=(lambda done, total: progress(done, total, {})) if progress else None, **o.objective_options)
    p.module.eval()
    features = encode(p.module, tokenize, texts)
    if not np.isfinite(features).all():
        # Whether an overflowing weight gives inf or NaN here depends on how the CPU rounds (seen
        # on an AMD EPYC with AVX-512, not on Intel): the outputs are checked, not the loss alone.
        raise TrainingDivergedError("the tuned backbone's output on training items", "lr")
    clf = LogisticRegression(max_iter=2000, random_state=settings.seed, class_weight=o.class_weight)
    clf.fit(features, y)
    if p.val_idx is not None:
        given = job.v_payloads is not None
        source, offset = (job.v_payloads, len(job.payloads)) if given else (job.payloads, 0)
        v_texts = [source[i - offset] for i in p.val_idx]
        history[-1]["val_accuracy"] = float((clf.predict(encode(p.module, tokenize, v_texts))
                                             == p.classes[p.y[p.val_idx]]).mean())
    return clf, history


def _own_checkpoints(stack: contextlib.ExitStack, folder: Path) -> None:
    """Hold ``folder``'s writer lock until ``stack`` closes: two runs never write one checkpoint folder.

    Raises:
        OutputError: another live run holds it.
    """
    folder.mkdir(exist_ok=True)
    if not stack.enter_context(owned(folder / "checkpoint.lock")):
        raise OutputError(f"another fine-tune is writing the checkpoints in {folder} now; wait for it to end, or "
                          "choose another checkpoint_dir")


# -- persist: the new backbone, its export, the classifier ----------------------------------------
def persist(job: Job, p: Prepared, o: Options, clf: Any, history: list[dict[str, Any]]) -> FinetuneResult:
    """Store the tuned module as a new backbone with its lineage, export it, and make (and save to
    ``o.out``) the classifier over raw items; ``seconds`` is left for the caller.

    Raises:
        TrainingDivergedError: the export's probes saw NaN / infinite outputs (the backbone is removed).
        ExportError: another export failure (the backbone is removed).
    """
    from sklearn.pipeline import Pipeline

    parent, artifact = job.parent, p.artifact
    parent_spec = portable_spec(job.backbone) if isinstance(job.backbone, str) else parent.name
    lineage = {
        "parent": {"name": parent.name, "spec": parent_spec,
                   "digest": artifact.digest, "export_key": export_key(parent)},
        "data": {"fingerprint": p.fingerprint, "items": int(len(p.good)), "excluded": len(p.failures),
                 "classes": [str(c) for c in p.classes],
                 **({"validation_fingerprint": p.validation_fingerprint} if p.validation_fingerprint else {})},
        "hyperparameters": p.hyper, "device": job.device, "metrics": history, "warnings": list(p.warnings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    new, created = tuned.persist(job.models.root, o.name or "", parent, parent_spec, p.module, lineage,
                                 user_named=o.name is not None)
    try:
        exported = export(new, job.models)
    except ExportError as exc:  # not left in the store as a backbone that lists but never exports
        if created:
            tuned.discard(new)
        if isinstance(exc, NonFiniteOutputError):
            raise TrainingDivergedError("the tuned backbone's output on the export's probes",
                                        "lr" if o.objective == "contrastive" else "lr / head_lr") from exc
        raise
    model = Pipeline([("embed", Embedder(new.name, store=str(job.models.root)).fit()), ("head", clf)])
    saved = save(model, o.out) if o.out is not None else None
    if saved is not None:
        tuned.record_user(new, saved)  # a dependent: the fine-tune is not removed while this model exists
    return FinetuneResult(backbone=new.name, digest=exported.digest, parent=parent.name,
                          parent_digest=artifact.digest, history=history, model=model, model_path=saved,
                          failures=p.failures, classes=p.classes.tolist(), lineage=new.lineage,
                          warnings=list(p.warnings))
