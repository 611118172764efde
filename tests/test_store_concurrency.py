"""Maintenance never breaks work in progress: extract, gc, load and verify at once on one store
(issue 10, kind 2), as real processes with a real (tiny) model."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from store_support import tiny_fixture  # noqa: F401 (the tiny fixture)

import embedkit
from embedkit.features.store import FeatureStore
from embedkit.inputs.files import content_id

LOOP = """
import json, sys, time, traceback
from pathlib import Path
from embedkit.features.store import FeatureStore
root, action, stop, out = sys.argv[1:5]
stats = {{"runs": 0, "gc_ran": [], "gc_busy": 0, "rows": [], "problems": [], "errors": []}}
while not Path(stop).exists() or stats["runs"] == 0:
    store = FeatureStore(root)
    try:
        if action == "gc":
            for counts in store.gc().values():
                if counts.get("busy"):
                    stats["gc_busy"] += 1
                else:
                    stats["gc_ran"].append(time.time())
        elif action == "load" and store.namespaces():
            ids, X = store.load({name!r})
            assert len(ids) == len(set(ids.tolist())) == X.shape[0], "an id served twice"
            stats["rows"].append(len(ids))
        elif action == "verify":
            stats["problems"] += [p.reason for ps in store.verify().values() for p in ps]
    except Exception:
        stats["errors"].append(traceback.format_exc())
    stats["runs"] += 1
    time.sleep(0.05 if action == "gc" else 0.005)
Path(out).write_text(json.dumps(stats))
"""


def test_extract_gc_load_and_verify_at_once_on_one_store(tiny, tmp_path: Path):
    texts = [f"sentence {i} about a card payment" for i in range(400)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    store, stop = tmp_path / "fs", tmp_path / "stop"
    loop = tmp_path / "loop.py"
    loop.write_text(LOOP.format(name=tiny.name))
    workers = {action: subprocess.Popen([sys.executable, str(loop), str(store), action, str(stop),
                                         str(tmp_path / f"{action}.json")], stderr=subprocess.PIPE, text=True)
               for action in ("gc", "load", "verify")}
    time.sleep(3)  # the loops are running before the first shard is written
    started = time.time()
    extracts = [subprocess.run([sys.executable, "-m", "embedkit.cli", "extract", str(source), "--backbone",
                                str(tiny.path), "--out", str(store), "--shard-size", "4", "--no-progress", "--json"],
                               capture_output=True, text=True, timeout=600) for _ in range(2)]
    ended = time.time()
    stop.touch()
    for action, proc in workers.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{action}: {err}"
    stats = {a: json.loads((tmp_path / f"{a}.json").read_text()) for a in workers}
    for action, s in stats.items():
        assert s["errors"] == [], f"{action} crashed: {s['errors'][0]}"
    assert stats["verify"]["problems"] == []
    assert sum(started < t < ended for t in stats["gc"]["gc_ran"]) >= 3  # gc ran beside the writers, not only waited
    assert max(stats["load"]["rows"]) <= 400 and len(stats["load"]["rows"]) >= 2
    first, second = (e for e in extracts)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["total"], report["ok"], report["computed"], report["failed"]) == (400, 400, 400, 0)
    assert second.returncode == 0 and json.loads(second.stdout)["cached"] == 400, second.stderr
    # every item exactly once, with its own vector
    ns = FeatureStore(store).find(tiny.name)
    assert ns.verify() == []
    ids, X = ns.load()
    assert sorted(ids.tolist()) == sorted(content_id(t.encode()) for t in texts)
    reference = dict(zip((content_id(t.encode()) for t in texts), embedkit.embed(texts, backbone=str(tiny.path)).vectors))
    np.testing.assert_allclose(np.asarray(X), np.stack([reference[i] for i in ids.tolist()]), atol=1e-5)
    assert FeatureStore(store).info()[0]["rows"] == 400
