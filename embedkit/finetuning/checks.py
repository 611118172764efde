"""The checks :func:`embedkit.finetune` makes before any work (:func:`validate`): settings,
names, the parent backbone, objective options, items and labels, output folders.

Each refusal is a typed error whose message names the Python parameter and what it allows.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backbones.backbone import NAME_PATTERN, Backbone
from ..backbones.blocks import parse_unfreeze
from ..backbones.registry import get_backbone
from ..errors import DatasetError, DeviceUnavailableError, OutputExistsError, UsageError
from ..fs.outputs import check_output
from ..heads.training import check_classes
from ..models import finetuned as tuned
from ..models.store import ModelStore
from .checkpoints import check_folder
from .contrastive import OPTIONS, check_options
from .dataset import items_of
from .loop import Settings

OBJECTIVES = ("classify", "contrastive")


@dataclass(frozen=True)
class Options:
    """:func:`finetune`'s keyword settings, as given (``objective_options``: its ``**`` keywords)."""

    unfreeze: str
    objective: str
    epochs: int
    batch_size: int
    lr: float
    head_lr: float
    layer_decay: float | None
    weight_decay: float
    warmup: float
    max_grad_norm: float | None
    validation: Any
    patience: int | None
    class_weight: Any
    seed: int
    device: str
    augment: bool
    checkpoint_dir: str | Path | None
    checkpoint_every: int | None
    resume: bool
    name: str | None
    store: Any
    out: str | Path | None
    train_batchnorm: bool
    objective_options: dict[str, Any]

    def hyperparameters(self, unfreeze: str) -> dict[str, Any]:
        """What the lineage and the checkpoint marker record (``unfreeze``: its canonical form)."""
        return {"objective": self.objective, "unfreeze": unfreeze, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "head_lr": self.head_lr, "layer_decay": self.layer_decay,
                "weight_decay": self.weight_decay, "warmup": self.warmup, "max_grad_norm": self.max_grad_norm,
                "validation": self.validation if not isinstance(self.validation, tuple) else "given",
                "patience": self.patience, "class_weight": self.class_weight, "seed": self.seed,
                "augment": self.augment, "train_batchnorm": self.train_batchnorm, **self.objective_options}

    def settings(self, device: str) -> Settings:
        return Settings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, head_lr=self.head_lr,
                             layer_decay=self.layer_decay, weight_decay=self.weight_decay, warmup=self.warmup,
                             max_grad_norm=self.max_grad_norm, patience=self.patience, seed=self.seed, device=device,
                             checkpoint_every=self.checkpoint_every)


@dataclass
class Job:
    """What :func:`validate` settled: the parent, the checked items and labels, where outputs go."""

    backbone: Any  # as given: a name or spec is exported by it (its portable spec goes in the lineage)
    parent: Backbone
    spec: Any  # the parsed ``unfreeze``
    models: ModelStore
    device: str
    payloads: list[Any]
    ids: list[str]
    y_raw: np.ndarray
    v_payloads: list[Any] | None = None  # given validation items, their content ids and their labels
    v_ids: list[str] | None = None
    v_raw: np.ndarray | None = None
    checkpoints: Path | None = None


def validate(backbone: Any, items: Any, labels: Sequence[Any], o: Options) -> Job:
    """Refuse bad settings, names, items, labels and output folders before any work.

    Raises:
        see :func:`finetune`.
    """
    device = check_settings(objective=o.objective, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                            head_lr=o.head_lr, layer_decay=o.layer_decay, weight_decay=o.weight_decay,
                            warmup=o.warmup, max_grad_norm=o.max_grad_norm, validation=o.validation,
                            patience=o.patience, class_weight=o.class_weight, device=o.device,
                            checkpoint_every=o.checkpoint_every, resume=o.resume, checkpoint_dir=o.checkpoint_dir,
                            seed=o.seed)
    for flag, value in (("augment", o.augment), ("resume", o.resume), ("train_batchnorm", o.train_batchnorm)):
        if not isinstance(value, (bool, np.bool_)):  # "false" would be taken as True
            raise UsageError(f"{flag} must be True or False, got {value!r}")
    spec = parse_unfreeze(o.unfreeze)
    models = o.store if isinstance(o.store, ModelStore) else ModelStore(o.store)
    parent = _parent(backbone, o, models, str(spec), device)
    job = _read_items(Job(backbone, parent, spec, models, device, [], [], np.empty(0)), items, labels, o)
    job.checkpoints = Path(o.checkpoint_dir) if o.checkpoint_dir is not None else None
    outputs = [p for p in (items,) if isinstance(p, (str, Path))]
    if job.checkpoints is not None:  # new, empty, or an earlier checkpoint folder (its marker's kind)
        check_folder(job.checkpoints, bool(o.resume))  # its checkpoints accounted for by a readable marker
        check_output(job.checkpoints, "checkpoints", inputs=outputs)
    if o.out is not None:
        check_output(o.out, "model", inputs=outputs)
    if parent.onnx is not None:
        raise UsageError(f"backbone {parent.name!r} is ONNX-only: it has no torch module to fine-tune")
    tuned.check_writable(models.root)  # a read-only store is found now, not after the training
    return job


def _parent(backbone: Any, o: Options, models: ModelStore, unfreeze: str, device: str) -> Backbone:
    """The parent backbone, once the new name and the objective's options are checked against it
    (``unfreeze``: the canonical form of ``o.unfreeze``; ``device``: the one to train on)."""
    if o.name is not None and (not isinstance(o.name, str) or not NAME_PATTERN.match(o.name)):
        raise UsageError(f"name must match {NAME_PATTERN.pattern}, got {o.name!r}")
    if o.name is not None:
        tuned.check_name(models.root, o.name)  # a registered backbone's name: refused now, not after training
        existing = tuned.find(o.name, models.root)
        if existing is not None and o.resume and _made_here(existing, o.checkpoint_dir) and not _made_here(
                existing, o.checkpoint_dir, o.hyperparameters(unfreeze), device):
            # the folder's run made it, but these settings are not that run's: the real reason, and what works
            recorded = json.loads(json.dumps((existing.lineage or {}).get("hyperparameters") or {}, default=str))
            asked = json.loads(json.dumps(o.hyperparameters(unfreeze), default=str))
            diff = sorted(k for k in set(recorded) | set(asked) if recorded.get(k) != asked.get(k)) or ["device"]
            raise OutputExistsError(f"a fine-tuned backbone {o.name!r} is already in the model store {models.root}, "
                                    f"made by the run of this checkpoint_dir with other settings ({', '.join(diff)} "
                                    "differ): to finish or confirm that run, resume with its settings; to train with "
                                    "these ones, choose another name")
        if existing is not None and not (o.resume and _made_here(existing, o.checkpoint_dir)):
            # resume is suggested only where it would finish that run: its checkpoints, with these settings
            hint = " (or, to finish or confirm the run of this checkpoint_dir that made it, run again with resume)" \
                if not o.resume and _made_here(existing, o.checkpoint_dir, o.hyperparameters(unfreeze), device) else ""
            made = ""
            if o.resume:
                has = o.checkpoint_dir is not None and (Path(o.checkpoint_dir) / "checkpoint.json").is_file()
                made = (" by a run other than the one whose checkpoints are in this checkpoint_dir" if has else
                        ", and this checkpoint_dir holds no checkpoints of the run that made it (resume finishes a "
                        "run only from its own checkpoint folder: give that run's checkpoint_dir)")
            raise OutputExistsError(f"a fine-tuned backbone {o.name!r} is already in the model store {models.root}"
                                    f"{made}; choose another name{hint}")
    parent = get_backbone(backbone) if isinstance(backbone, str) else backbone
    if not isinstance(parent, Backbone):
        raise UsageError(f"backbone must be a name, spec or embedkit.Backbone, got {type(parent).__name__}")
    if o.objective == "contrastive" and parent.modality != "text":
        raise UsageError("objective='contrastive' (SetFit) is for text backbones; use objective='classify'")
    if o.objective == "contrastive" and o.checkpoint_dir is not None:
        raise UsageError("checkpoint_dir / resume are for objective='classify' (a contrastive run is short: rerun it)")
    check_objective_options(o.objective, o.objective_options, patience=o.patience, layer_decay=o.layer_decay)
    return parent


def _made_here(existing: Any, checkpoint_dir: str | Path | None, hyperparameters: dict[str, Any] | None = None,
               device: str | None = None) -> bool:
    """Whether ``existing`` (a fine-tune already in the store under the name asked for) was made by
    the run whose checkpoints are in ``checkpoint_dir``: its lineage's parent, data and
    hyperparameters are the folder's ``checkpoint.json``'s (and, given, ``hyperparameters`` and
    ``device`` are too: this call's settings would resume that run). A resume of that run finishes it after a
    kill that left its weights in the store (during the export or the save of the classifier), or
    confirms a finished run; the weights themselves are compared when the run claims the name
    (:func:`embedkit.models.finetuned.persist`).
    """
    import json

    if checkpoint_dir is None:
        return False
    try:
        config = json.loads((Path(checkpoint_dir) / "checkpoint.json").read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    lineage = existing.lineage or {}
    recorded = json.loads(json.dumps(lineage.get("hyperparameters"), default=str))
    return (config.get("parent") == (lineage.get("parent") or {}).get("digest")
            and config.get("data") == (lineage.get("data") or {}).get("fingerprint")
            and config.get("hyperparameters") == recorded
            and (hyperparameters is None or json.loads(json.dumps(hyperparameters, default=str)) == recorded)
            and (device is None or config.get("device") == device))


def _read_items(job: Job, items: Any, labels: Sequence[Any], o: Options) -> Job:
    """``job`` with the items and their checked labels (and the given validation items and labels)."""
    job.payloads, job.ids, _ = items_of(items, job.parent.modality)
    job.y_raw = check_labels(labels, len(job.payloads))
    check_classes(job.y_raw)
    if isinstance(o.validation, tuple):
        job.v_payloads, job.v_ids, _ = items_of(o.validation[0], job.parent.modality)
        job.v_raw = check_labels(o.validation[1], len(job.v_payloads), "validation items")
        if not job.v_payloads:
            raise DatasetError("validation=(items, labels) holds no items; give validation items, a fraction such as "
                               "0.1, or None for no validation")
    return job


def _missing(value: Any) -> bool:
    """None, NaN, pandas' NA / NaT or a blank string: no label."""
    if value is None:
        return True
    if type(value).__module__.startswith("pandas") and type(value).__name__ in ("NAType", "NaTType"):
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
    if isinstance(labels, (dict, set, frozenset)) or type(labels).__name__ in ("dict_keys", "dict_values"):
        raise DatasetError(f"labels must be an ordered sequence with one label per item, got a {type(labels).__name__} "
                           "(a dict would give its keys, a set an arbitrary order)")
    shape = getattr(labels, "shape", None)
    if shape is not None and len(shape) != 1:
        fix = "; flatten them (labels.ravel(), or the one column of a table)" if len(shape) == 2 and shape[-1] == 1 \
            else "; give one label (a string or an integer) per item"
        raise DatasetError(f"labels must be one-dimensional, one label per item, got shape {tuple(shape)}{fix}")
    try:
        labels = list(labels)
    except TypeError as exc:
        raise DatasetError(f"labels must be a sequence with one label per item, got {type(labels).__name__}") from exc
    if len(labels) != n:
        raise DatasetError(f"{len(labels)} labels for {n} {what}: give exactly one label per item")
    bad = [i for i, v in enumerate(labels) if _missing(v)]
    if bad:
        raise DatasetError(f"{len(bad)} of {n} labels are missing (None, NaN or empty), e.g. at index "
                           f"{', '.join(map(str, bad[:5]))}; label every item or leave those items out")
    nested = [i for i, v in enumerate(labels) if isinstance(v, (list, tuple, set, frozenset, dict, np.ndarray))
              or not isinstance(v, Hashable)]
    if nested:
        first = labels[nested[0]]
        raise DatasetError(f"{len(nested)} of {n} labels are not single values (e.g. a {type(first).__name__} "
                           f"{first!r:.60} at index {nested[0]}); give one label (a string or an integer) per item, "
                           "e.g. the first column of a one-column table")
    odd = [v for v in labels if not isinstance(v, (str, int, float, np.str_, np.integer, np.floating, np.bool_))]
    if odd:  # Enum, complex, Decimal, Fraction...: classes that do not order or compare as the rest do
        raise DatasetError(f"labels must be strings, integers or whole-number floats; got a {type(odd[0]).__name__} "
                           f"({odd[0]!r:.60}); map them to strings or integers first")
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


def plain(value: Any) -> Any:
    """A numpy number as the Python number it holds (``np.int64(3)`` -> 3, ``np.float32(2e-5)`` ->
    a float; ``np.bool_`` -> bool, refused by the checks); anything else as given."""
    return value.item() if isinstance(value, np.generic) and isinstance(value, (np.number, np.bool_)) else value


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
    if layer_decay is not None and not (isinstance(layer_decay, (int, float)) and not isinstance(layer_decay, bool)
                                        and 0 < layer_decay <= 1):
        raise UsageError(f"layer_decay must be None or a number in (0, 1], got {layer_decay!r}")
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0 \
            or not math.isfinite(weight_decay):
        raise UsageError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
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
    return _device(device)


def _device(device: str) -> str:
    """The device to train on (``auto``: CUDA when torch sees one, else CPU).

    Raises:
        DeviceUnavailableError: ``cuda[:N]`` without a CUDA device.
        UsageError: another value.
    """
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


def check_objective_options(objective: str, options: dict[str, Any], **settings: Any) -> None:
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

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(f"objective='contrastive' takes the options {', '.join(OPTIONS)}, got {unknown}")
    check_options(**options)
    ignored = [k for k, v in settings.items() if v is not None]
    if ignored:
        raise UsageError(f"objective='contrastive' does not use {', '.join(ignored)} (its head is a LogisticRegression "
                         "fitted after the body is tuned): leave them out, or use objective='classify'")


def class_weights(class_weight: Any, classes: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """The loss's weight of each class (in ``classes``' order), or None: unweighted.

    Raises:
        UsageError: ``class_weight`` names a label that is not in the data.
    """
    if class_weight is None:
        return None
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    if class_weight == "balanced":  # scikit-learn's rule: n / (classes * count)
        return (len(y) / (len(classes) * np.maximum(counts, 1))).astype(np.float32)
    unknown = [k for k in class_weight if k not in set(classes.tolist())]
    if unknown:
        raise UsageError(f"class_weight names labels that are not in the data: {unknown[:5]}")
    return np.asarray([float(class_weight.get(c, 1.0)) for c in classes], dtype=np.float32)
