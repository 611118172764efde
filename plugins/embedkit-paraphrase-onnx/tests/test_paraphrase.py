"""The ONNX-only backbone as a third party ships it: no torch in the process, checked and exact.

Each test runs in a subprocess whose ``torch`` import is blocked (``sys.modules['torch'] = None``
before embedkit is imported), and asserts at the end that no torch module was loaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


NO_TORCH = "import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
TORCH_LEFT = "print('TORCH', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') and sys.modules[m] is not None))\n"


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code + TORCH_LEFT], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)


def test_check_passes_without_torch(plugin_env, tmp_path):
    done = run_python(
        "import embedkit.cli\n"
        "code = embedkit.cli.main(['check', 'paraphrase-minilm-l3'])\nprint('EXIT', code)\n",
        {**plugin_env, "EMBEDKIT_HOME": str(tmp_path)},
    )
    out = done.stdout
    assert "EXIT 0" in out, out + done.stderr
    assert "TORCH []" in out
    for rule in ("spec", "export", "dynamic-axes", "output", "parity", "determinism", "reference",
                 "batch-invariance", "export-determinism", "preprocess-roundtrip"):
        assert f"ok  {rule}\n" in out, rule
    assert "skipped  build: ONNX-only backbone" in out
    assert "paraphrase-minilm-l3: all rules pass" in out and "vs the source ONNX file" in out


def test_equals_the_onnx_file_itself_on_500_banking77_texts(plugin_env, banking77_test):
    code = f"""
import csv, json
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
import embedkit
from embedkit_paraphrase_onnx import OUTPUT, onnx_path, tokenizer_path

with open({str(banking77_test)!r}, newline="", encoding="utf-8") as f:
    texts = [row["text"] for row in csv.DictReader(f)][:500]
got = embedkit.embed(texts, backbone="paraphrase-minilm-l3")
assert got.ok.all()

# The file's own output: ONNX Runtime on the shipped graph, one unpadded text at a time.
tok = Tokenizer.from_file(str(tokenizer_path()))
tok.no_padding()
tok.enable_truncation(128)
session = ort.InferenceSession(str(onnx_path()), providers=["CPUExecutionProvider"])
ref = []
for text in texts:
    ids = np.array([tok.encode(text).ids], dtype=np.int64)
    ref.append(session.run([OUTPUT], {{"input_ids": ids, "attention_mask": np.ones_like(ids)}})[0][0])
ref = np.stack(ref)
print("RESULT", json.dumps({{"n": len(texts), "shape": list(got.vectors.shape),
                            "max_abs_diff": float(np.abs(got.vectors - ref).max()),
                            "norm": float(np.linalg.norm(ref, axis=1).mean())}}))
"""
    done = run_python(code, plugin_env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, done.stdout + done.stderr
    result = json.loads(line[len("RESULT "):])
    print(result)
    assert result["n"] == 500 and result["shape"] == [500, 384]
    assert result["max_abs_diff"] <= 1e-5
    assert abs(result["norm"] - 1.0) > 0.1  # not normalised: normalize=False leaves the file's vectors as they are
    assert "TORCH []" in done.stdout
