"""Export: checker, parity gate with measured numbers, manifest, deterministic reuse."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from support import ROOT
from tiny import text_backbone

import embedkit
from embedkit.models.store import sha256_file
from embedkit_text import minilm_folder
from embedkit_text.folder import folder_backbone


def test_manifest_records_identity_and_parity(minilm):
    m = minilm.manifest
    assert m["digest"] == sha256_file(minilm.onnx_path) == minilm.path.name
    assert minilm.path.parent.name == "minilm-l6"
    assert m["exporter"] == "torchscript"
    assert m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["min_cosine"] >= 0.99999
    assert m["parity"]["batch_sizes"] == [1, 7]
    assert m["preprocess"]["max_length"] == 256 and m["preprocess"]["pooling"] == "mean"
    assert m["preprocess"]["tokenizer_sha256"] == sha256_file(minilm_folder() / "tokenizer.json")
    assert m["dim"] == 384 and m["license"] == "Apache-2.0"
    import onnx

    model = onnx.load(str(minilm.onnx_path), load_external_data=False)
    for value in model.graph.input:  # batch and sequence axes are symbolic
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["embedkit.preprocess"])["max_length"] == 256


def test_export_is_reused_not_redone(minilm, monkeypatch):
    from embedkit_text.folder import FolderBackbone

    def no_build(self):
        raise AssertionError("build() called although an artifact with this export key exists")

    monkeypatch.setattr(FolderBackbone, "build", no_build)
    before = minilm.onnx_path.stat().st_mtime_ns
    again = embedkit.export("minilm-l6")
    assert again.path == minilm.path and again.onnx_path.stat().st_mtime_ns == before
    with pytest.raises(AssertionError, match="build"):
        embedkit.export("minilm-l6", force=True)


def test_export_is_deterministic_and_name_independent(minilm, tmp_path):
    # The MiniLM folder given by path is read as a sentence-transformers folder: same settings,
    # another name, another store, a fresh export: the very same file.
    by_path = embedkit.export(str(minilm_folder()), tmp_path, force=True)
    assert by_path.name == "model"
    assert by_path.digest == minilm.digest


def test_preprocessing_change_changes_the_digest(minilm, tmp_path):
    shorter = folder_backbone(minilm_folder(), name="minilm-l6", max_length=128)
    artifact = embedkit.export(shorter, tmp_path)
    assert artifact.digest != minilm.digest
    assert artifact.manifest["export_key"] != minilm.manifest["export_key"]


class Branchy(torch.nn.Module):
    """Takes a data-dependent branch: a trace with an all-ones mask bakes in the wrong one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30522, 8)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        if bool(attention_mask.all()):
            return h.mean(1)
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)


def _branchy_backbone(name="branchy"):
    return text_backbone(name, Branchy)


def test_parity_gate_refuses_a_wrong_trace_with_numbers(tmp_path):
    with pytest.raises(embedkit.ExportParityError) as info:
        embedkit.export(_branchy_backbone(), tmp_path, exporter="torchscript")
    err = info.value
    assert err.parity["max_abs_diff"] > 1e-4 and err.limits["max_abs_diff"] == 1e-4
    assert "max |diff|" in str(err) and "min cosine" in str(err)
    assert not list((tmp_path / "branchy").glob("*/model.onnx"))  # nothing half-written is left
    assert isinstance(err, embedkit.ExportError)


def test_auto_reports_the_measured_mismatch(tmp_path):
    with pytest.raises(embedkit.ExportParityError):
        embedkit.export(_branchy_backbone(), tmp_path)


def test_corrupted_artifact_is_detected(minilm, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(minilm.path, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(embedkit.ArtifactError, match="corrupted"):
        embedkit.Artifact.open(copy)
    with pytest.raises(embedkit.ArtifactError):
        embedkit.Embedder(str(copy)).fit()


def test_export_without_torch_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import embedkit\n"
        "try:\n    embedkit.export('minilm-l6')\n"
        "except embedkit.MissingDependencyError as e:\n    print('MISSING', e.extra, isinstance(e, ImportError))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "EMBEDKIT_HOME": str(tmp_path)}, cwd=ROOT, timeout=300)
    assert "MISSING export True" in out.stdout, out.stderr


def test_unknown_exporter_and_backbone(tmp_path):
    with pytest.raises(ValueError, match="exporter"):
        embedkit.export("minilm-l6", tmp_path, exporter="magic")
    with pytest.raises(embedkit.UnknownBackboneError) as info:
        embedkit.export("no-such-backbone", tmp_path)
    assert isinstance(info.value, KeyError) and "minilm-l6" in str(info.value)


def test_export_output_is_the_declared_dimension(tmp_path):
    wrong = text_backbone("wrong-dim", Branchy, dim=16)
    with pytest.raises(embedkit.ExportError, match="declared"):
        embedkit.export(wrong, tmp_path, exporter="torchscript")


def test_runtime_needs_no_torch(minilm):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import embedkit\n"
        f"r = embedkit.embed(['hello world'], backbone={str(minilm.path)!r})\n"
        "print('OK', r.vectors.shape, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "OK (1, 384) False" in out.stdout, out.stderr


def test_an_artifact_reused_by_name_is_verified_so_a_corrupted_graph_is_never_served(tmp_path):
    """export() reused an existing artifact without checking its sha256: a flipped weight gave
    other vectors (by name, through embed and extract) under the good digest's namespace."""
    from tiny import Pooled

    backbone = text_backbone("tiny-verified", lambda: Pooled().eval())
    first = embedkit.export(backbone, tmp_path)
    assert embedkit.export(backbone, tmp_path).digest == first.digest  # intact: reused
    onnx_file = first.path / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(embedkit.ArtifactError, match="corrupted"):
        embedkit.export(backbone, tmp_path)
