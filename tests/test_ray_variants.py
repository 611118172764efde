"""The Ray engine writes into the namespace variant the driver chose (issue 25): chunked texts never land
beside truncated ones, whichever engine extracts them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("psutil")

from test_ray import ray_cluster  # noqa: E402, F401 (the module's private local Ray)

import embedkit  # noqa: E402
from embedkit import FeatureStore  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_ray_extracts_into_the_chunk_variant_and_derives_its_compact_namespace(tmp_path: Path):
    long_text = " ".join(f"word{i} and more" for i in range(120))  # over the window of 64 tokens
    items = [long_text, "a short text"] + [f"text number {i}" for i in range(20)]
    options = dict(long="chunk", chunk_overlap=8, max_chunks=16, precision="binary", shard_size=8)
    local = embedkit.extract(items, "tiny-ray", tmp_path / "local", **options)
    ray = embedkit.extract(items, "tiny-ray", tmp_path / "ray", engine="ray", workers=2, **options)
    assert Path(ray.namespace).name.endswith(".chunk-o8-m16") and ray.computed == local.computed == len(items)
    assert ray.compact["rows"] == len(items) and ray.compact["variant"] == "chunk-o8-m16.binary"
    store = FeatureStore(tmp_path / "ray")
    assert sorted(n.tag for n in store.namespaces()) == ["chunk-o8-m16", "chunk-o8-m16.binary"]  # no plain one
    for precision in ("float32", "binary"):
        ids_l, X_l = FeatureStore(tmp_path / "local").load("tiny-ray", long="chunk", precision=precision)
        ids_r, X_r = store.load("tiny-ray", long="chunk", precision=precision)
        a, b = np.argsort(ids_l), np.argsort(ids_r)
        assert ids_l[a].tolist() == ids_r[b].tolist()
        assert np.abs(np.asarray(X_l, np.float32)[a] - np.asarray(X_r, np.float32)[b]).max() <= 1e-6
