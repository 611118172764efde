"""The embedkit error hierarchy.

Every error mixes in the builtin a caller would naturally catch, so
``except KeyError`` still works for an unknown backbone name.
"""
from __future__ import annotations

from typing import Any


class EmbedkitError(Exception):
    """Base class of every error raised by embedkit."""


class UnknownBackboneError(EmbedkitError, KeyError):
    """A backbone name that no loaded plugin registered."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = sorted(available)
        super().__init__(name)

    def __str__(self) -> str:
        names = ", ".join(self.available) or "none (is a plugin such as embedkit-text installed?)"
        return (
            f"unknown backbone {self.name!r}; registered backbones: {names}. "
            "A local Hugging Face or sentence-transformers folder can be given by path."
        )


class InvalidBackboneError(EmbedkitError, ValueError):
    """A backbone declaration that breaks the contract (bad name, dim, preprocessing...)."""

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(f"[{rule}] {message}")


class PluginError(EmbedkitError, RuntimeError):
    """A plugin that failed to load or registered something invalid."""


class DuplicateBackboneError(PluginError):
    """Two plugins registered the same backbone name."""


class MissingDependencyError(EmbedkitError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str, install: str | None = None):
        self.module = module
        self.extra = extra
        # The exact command: an extra of another distribution (embedkit-vision[zoo]) passes it.
        self.install = install or (f"pip install 'embedkit[{extra}]'" if extra else f"pip install '{module.split('.')[0]}'")
        torch_hint = " (install torch==2.13.0 first for the CPU build)" if extra == "export" and not install else ""
        super().__init__(f"{purpose} needs the '{module}' package: {self.install}{torch_hint}")


class ExportError(EmbedkitError, RuntimeError):
    """Exporting a backbone to ONNX failed."""


class ExportParityError(ExportError):
    """The exported ONNX graph disagrees with the torch module on the probe inputs."""

    def __init__(self, name: str, exporter: str, parity: dict[str, Any], limits: dict[str, float]):
        self.name = name
        self.exporter = exporter
        self.parity = parity
        self.limits = limits
        scale = float(parity.get("output_scale", 1.0))
        scaled = f" x output scale {scale:.3g}" if scale > 1.0 else ""
        super().__init__(
            f"ONNX export of {name!r} ({exporter}) failed the parity gate: "
            f"max |diff| = {parity['max_abs_diff']:.3g} (limit {limits['max_abs_diff']:g}{scaled}), "
            f"min cosine = {parity['min_cosine']:.8f} (limit {limits['min_cosine']:g}) "
            f"on {parity['probes']} probes at batch sizes {parity['batch_sizes']}"
        )


class ArtifactError(EmbedkitError, RuntimeError):
    """A model-store artifact is missing, incomplete or corrupted."""


class DeviceUnavailableError(EmbedkitError, RuntimeError):
    """The requested device (e.g. CUDA) is not what the ONNX Runtime session runs on."""


class InvalidInputError(EmbedkitError, ValueError):
    """Some input items could not be embedded; ``errors`` lists one record per bad item.

    ``ok`` (when given) is the boolean mask of the items that did embed, in input order, so a
    caller can keep the good items: ``[x for x, k in zip(X, exc.ok) if k]``.
    """

    def __init__(self, errors: list[Any], ok: Any = None):
        self.errors = list(errors)
        self.ok = ok
        shown = "; ".join(f"item {e.index}: {e.code} ({e.message})" for e in self.errors[:5])
        more = f" and {len(self.errors) - 5} more" if len(self.errors) > 5 else ""
        super().__init__(f"{len(self.errors)} input item(s) could not be embedded: {shown}{more}")


class UnsafeModelError(EmbedkitError, PermissionError):
    """Loading would run code from a file (a pickle, an untrusted skops type) or a file changed."""


class StoreError(EmbedkitError, RuntimeError):
    """The feature store is inconsistent, of another schema, or lacks what was asked for."""


class UnsupportedInputError(EmbedkitError, ValueError):
    """An input file or column embedkit cannot read (wrong format, missing column)."""


class BackboneCheckError(EmbedkitError, AssertionError):
    """A backbone failed one rule of :func:`embedkit.testing.check_backbone`."""

    def __init__(self, backbone: str, rule: str, message: str):
        self.backbone = backbone
        self.rule = rule
        super().__init__(f"backbone {backbone!r} breaks rule '{rule}': {message}")


class ArtifactMismatchError(ArtifactError):
    """An export gave another artifact digest than the one required (e.g. by a saved model)."""

    def __init__(self, name: str, expected: str, got: str):
        self.name, self.expected, self.got = name, expected, got
        super().__init__(
            f"exporting {name!r} now gives artifact {got[:12]}..., not the required {expected[:12]}... "
            "(other weights, preprocessing or tool versions); nothing was kept"
        )


class BackboneNotAvailableError(ArtifactError, LookupError):
    """A required backbone artifact (by digest) is in no model store and cannot be re-made here."""

    def __init__(self, digest: str, name: str | None, store: Any, reason: str = "", needed_by: str = ""):
        self.digest, self.name, self.store, self.reason = digest, name, store, reason
        what = f"backbone {name!r} artifact {digest}" if name else f"backbone artifact {digest}"
        by = f" needed by {needed_by}" if needed_by else ""
        why = f" {reason}." if reason else ""
        # A variant is made from its parent's export; the others are exported from the backbone.
        variant = next((f"`embedkit {cmd} {name[:-len(suffix)]}{flag}`" for suffix, cmd, flag in (
            ("-fp16", "export", " --fp16"), ("-int8-dynamic-per-tensor", "quantize", " --variant dynamic-per-tensor"),
            ("-int8-dynamic", "quantize", " --variant dynamic"), ("-int8-static", "quantize", " --variant static --data ...")
        ) if name and name.endswith(suffix)), None)
        remake = variant or f"`embedkit export {name or '<backbone>'}`"
        super().__init__(
            f"{what}{by} is not in the model store {store}.{why} To get it: copy the folder "
            f"<store>/{name or '<name>'}/{digest} from the machine that made it into {store} "
            f"(or point store= / --models / $EMBEDKIT_HOME at a store holding it), or make it again with "
            f"the same backbone, weights and tool versions ({remake})"
        )


class StoreWriteError(StoreError, OSError):
    """The feature store could not be written (read-only, disk full, no permission).

    ``path`` names what could not be written; nothing half-written is left behind.
    """

    def __init__(self, path: object, cause: OSError):
        import errno as _errno

        self.path = str(path)
        self.errno = cause.errno
        self.strerror = cause.strerror
        self.filename = self.path
        code = _errno.errorcode.get(cause.errno or 0, "")
        RuntimeError.__init__(
            self,
            f"cannot write {self.path}: {cause.strerror or cause}{f' ({code})' if code else ''}; "
            "nothing was committed: free disk space or make the store writable, then run again")

    def __str__(self) -> str:
        return str(self.args[0])

class OutputError(EmbedkitError, OSError):
    """An output target embedkit refuses to write; checked before any work starts."""


class OutputExistsError(OutputError, FileExistsError):
    """The target exists and is not an earlier embedkit output of the same kind."""


class OutputFolderMissingError(OutputError, FileNotFoundError):
    """The folder that should hold the output does not exist."""


class OutputIsInputError(OutputError, ValueError):
    """The output is, holds or lies inside one of the command's inputs."""


class UnsavableHeadError(EmbedkitError, TypeError):
    """A head :func:`embedkit.save` refuses because :func:`embedkit.load` could not read it back safely."""


class UsageError(EmbedkitError, ValueError):
    """A command line that cannot run: a bad option value, a missing argument, a path that does not exist.

    ``usage`` is the command's usage line, printed before the message.
    """

    def __init__(self, message: str, usage: str = ""):
        self.usage = usage
        super().__init__(message)


class DatasetError(EmbedkitError, ValueError):
    """Labelled data too small or too degenerate for what was asked (one class, too few examples)."""


class BackboneInUseError(EmbedkitError, ValueError):
    """A fine-tuned backbone that other fine-tunes or saved models depend on cannot be removed;
    ``dependents`` names each of them."""

    def __init__(self, message: str, dependents: list[str]):
        self.dependents = dependents
        super().__init__(message)


class TrainingItemLostError(DatasetError):
    """A training item read when the run started cannot be read again during it (an image file
    removed, replaced by something unreadable, or made unreadable while the run re-reads it for
    augmentation); the run stops with its checkpoints, naming the item."""


class RayClusterError(EmbedkitError, ConnectionError):
    """The Ray cluster named by ``address`` cannot be reached (or a local Ray could not start)."""

    def __init__(self, address: str | None, reason: str):
        self.address = address
        where = f"the Ray cluster at {address!r}" if address is not None else "a local Ray instance"
        fix = ("check the address (host:port of the head's GCS, or 'auto' inside a cluster) and that the head is "
               "running (`ray status`)") if address is not None else ("run with engine='local' (--engine local), or see "
                                                                              "the Ray logs")
        super().__init__(f"cannot reach {where}: {reason}; {fix}")


class IncompleteExtractionError(EmbedkitError, RuntimeError):
    """An extraction ended with planned shards neither committed nor recorded as failed (run it again)."""

    def __init__(self, report: object, missing: int, why: str = "workers lost"):
        self.report = report
        self.missing = missing
        super().__init__(f"{missing} planned item(s) are neither stored nor recorded as failed ({why}); "
                         "run the same command again: committed shards are not computed again")


class InvalidUnfreezeError(EmbedkitError, ValueError):
    """An ``unfreeze`` value that is not ``head``, ``all`` or ``last:N`` (N from 1 to the number of blocks)."""


class NoBlocksError(EmbedkitError, ValueError):
    """``last:N`` asked of a backbone whose ordered blocks are neither declared nor inferable."""

    def __init__(self, backbone: str, reason: str):
        self.backbone = backbone
        self.reason = reason
        super().__init__(
            f"backbone {backbone!r} has no blocks, so unfreeze='last:N' has no meaning ({reason}); "
            "use unfreeze='head' or 'all', or declare the module's ordered blocks, input to output, as "
            "module-path patterns: Backbone(..., blocks=(\"embeddings\", \"encoder.layer.*\"))")

class CheckpointError(EmbedkitError, ValueError):
    """A fine-tuning checkpoint that cannot be resumed: unreadable, or made with other settings or data."""


class HeadBackboneMismatchError(ArtifactError, ValueError):
    """A head trained on one backbone's features, asked to run on another backbone's (e.g. a
    fine-tune of it): features of two networks never mix."""

    def __init__(self, head_digest: str, backbone: str, backbone_digest: str, detail: str = ""):
        self.head_digest, self.backbone, self.backbone_digest = head_digest, backbone, backbone_digest
        super().__init__(
            f"this head was trained on features of backbone artifact {head_digest}, but {backbone!r} is artifact "
            f"{backbone_digest}{detail}; a head only works on the features it was trained on: train a new head on "
            f"{backbone!r}'s features (or fine-tune with a head: embedkit.finetune)")

class InvalidAugmentError(EmbedkitError, ValueError):
    """A training augmentation setting out of range (crop scale, aspect ratio, flip probability)."""


class RayResourcesError(EmbedkitError, ValueError):
    """One Ray actor asks for more CPUs or GPUs than any node of the cluster has: it would wait forever."""

    def __init__(self, resource: str, wanted: float, largest: float):
        self.resource, self.wanted, self.largest = resource, wanted, largest
        option = {"CPU": "cpus_per_worker (--cpus-per-worker)", "GPU": "gpus_per_worker (--gpus-per-worker)"}[resource]
        super().__init__(f"an actor of {wanted:g} {resource} fits no node of the Ray cluster (the largest has "
                         f"{largest:g}); lower {option}, or add a node that has it before the run")


class TrainingDivergedError(EmbedkitError, RuntimeError):
    """Fine-tuning's loss or weights became NaN or infinite (a learning rate too high for the data)."""

    def __init__(self, where: str, settings: str = "lr / head_lr"):
        self.where = where
        super().__init__(f"training diverged: {where} is NaN or infinite; lower {settings} (e.g. by 10x) or keep "
                         "gradient clipping on (max_grad_norm=1.0); no backbone was saved")


class TrainingCollapsedError(TrainingDivergedError):
    """Fine-tuning made a backbone that embeds different items to (nearly) one vector: finite, but
    useless (a learning rate far too high, e.g. ``lr=1e4``); nothing is saved."""

    def __init__(self, where: str, cosine: float, parent_cosine: float, settings: str = "lr / head_lr"):
        self.where, self.cosine, self.parent_cosine = where, cosine, parent_cosine
        Exception.__init__(self, f"training diverged: {where} collapsed to (nearly) one vector (mean pairwise cosine "
                           f"{cosine:.7f}; the parent's {parent_cosine:.4f}); lower {settings} (e.g. by 10x) or keep "
                           "gradient clipping on (max_grad_norm=1.0); no backbone was saved")


class NonFiniteOutputError(ExportError):
    """The exported (or reference) model produced NaN or inf on the export's probes."""
