"""Every Ray run ends (issue 23, item 3): whatever crashes, ``embedkit extract --engine ray`` ends
with every item stored, its failures recorded (``worker_crashed`` after at most 6 attempts) or
exit 3 naming what is missing, within a stated time, and leaves no process behind.

The bound: a Ray Data pass ends once each job is committed or dropped after ``1 +
MAX_TASK_RETRIES`` attempts (each actor may restart ``restarts_for(jobs)`` times, more than the
pass's attempts, so the pool never runs out of actors); a pass with no block back and nothing
committed for ``EMBEDKIT_RAY_STALL_S`` seconds (default 600) is abandoned and its items are
missing. Each test runs the real CLI in a subprocess, with the poison plugin registered (as a
user's plugin would be), on a real private local Ray.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from support import ROOT  # noqa: E402

from embedkit import FeatureStore  # noqa: E402

TESTS = Path(__file__).resolve().parent
DRIVER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import embedkit, ray_plugin
embedkit.register_plugin(ray_plugin, "ray_plugin")
from embedkit.cli import main
sys.exit(main(sys.argv[1:]))
"""
RAY_NOISE = ("Token authentication", "(raylet)", "core_worker.cc", "A worker died", "retries remaining")


class Run:
    """The CLI in its own session; every process it starts is watched, so none can be left behind."""

    def __init__(self, tmp_path: Path, items: list[str], backbone: str, *extra: str, env: dict | None = None):
        self.source = tmp_path / "texts.txt"
        self.source.write_text("\n".join(items) + "\n")
        self.out = tmp_path / "fs"
        self.out.mkdir()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, "extract", str(self.source), "--backbone", backbone, "--out",
             str(self.out), "--engine", "ray", "--no-progress", "--json", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
            env={**os.environ, **(env or {})})
        self.seen: dict[int, psutil.Process] = {}

    def watch(self) -> list:
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            self.seen.setdefault(p.pid, p)
        return family

    def finish(self, timeout: float) -> tuple[int, dict, str, float]:
        deadline = self.start + timeout
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                self.watch()
                time.sleep(0.2)
            if self.proc.poll() is None:
                pytest.fail(f"the run did not end within {timeout:.0f} s")
            stdout, stderr = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        took = time.monotonic() - self.start
        gone, alive = psutil.wait_procs(list(self.seen.values()), timeout=30)
        assert not alive, f"processes left after the run: {[(p.pid, p.name()) for p in alive]}"
        return self.proc.returncode, json.loads(stdout) if stdout.strip() else {}, stderr, took


def stored_once(out: Path, backbone: str) -> list[str]:
    ids, _ = FeatureStore(out).load(backbone)
    assert len(ids) == len(set(ids.tolist()))  # never an item twice
    info = FeatureStore(out).info()[0]
    assert info["shard_rows"] == info["rows"], info
    return sorted(ids.tolist())


def texts(n: int) -> list[str]:
    return [f"message {i} about a card payment" for i in range(n)]


def test_two_items_that_kill_the_only_worker_are_recorded_as_worker_crashed(model_store, tmp_path: Path):
    from ray_plugin import MARKER

    from embedkit.features.ray import MAX_TASK_RETRIES

    items = texts(20)
    items = items[:5] + [f"the {MARKER} one"] + items[5:12] + [f"a {MARKER} two"] + items[12:]
    log = tmp_path / "attempts.log"
    run = Run(tmp_path, items, "tiny-ray-poison", "--workers", "1", "--shard-size", "8", "--runtime", "torch",
              env={"EMBEDKIT_TEST_POISON_LOG": str(log)})
    code, report, stderr, took = run.finish(timeout=420)  # before: spun for ever (16 minutes seen)
    assert code == 2, stderr[-3000:]  # items failed (--max-failures 0), nothing missing
    assert (report["total"], report["ok"], report["failed"], report["missing"]) == (22, 20, 2, 0)
    failures = FeatureStore(run.out).failures("tiny-ray-poison")
    assert sorted((f["source"], f["code"]) for f in failures) == [("texts.txt:line 14", "worker_crashed"),
                                                                  ("texts.txt:line 6", "worker_crashed")]
    assert len(stored_once(run.out, "tiny-ray-poison")) == 20
    attempts = log.read_text().split()
    assert 4 <= len(attempts) <= 2 * 2 * (1 + MAX_TASK_RETRIES), attempts  # at most 6 per item
    # Ray's own banners and worker-died paragraphs are not shown; one note says what they meant
    assert not [line for line in stderr.splitlines() if any(n in line for n in RAY_NOISE)], stderr[-3000:]
    assert "note: Ray reported" in stderr and "Traceback" not in stderr, stderr[-3000:]
    print(f"took {took:.0f} s")


def test_actors_that_die_while_loading_the_model_end_with_exit_3_naming_what_is_missing(model_store, tmp_path: Path):
    run = Run(tmp_path, texts(20), "tiny-ray-dies-loading", "--workers", "1", "--shard-size", "8", "--runtime",
              "torch", env={"EMBEDKIT_RAY_STALL_S": "20"})
    code, report, stderr, took = run.finish(timeout=240)  # before: waited for ever on a dead actor pool
    assert code == 3, stderr[-3000:]
    assert (report["total"], report["ok"], report["failed"], report["missing"]) == (20, 0, 0, 20)
    assert "error: 20 planned item(s) are neither stored nor recorded as failed" in stderr, stderr[-3000:]
    assert "(no progress for 20 s): texts.txt:line 1, texts.txt:line 2" in stderr, stderr[-3000:]  # what is missing, by source
    assert not list(run.out.glob("*/*/shards/*"))
    assert "Traceback" not in stderr, stderr[-3000:]
    print(f"took {took:.0f} s")


def test_actors_killed_several_times_in_a_row_still_end_the_run_with_every_item_accounted(model_store,
                                                                                           tmp_path: Path):
    items = texts(120)
    run = Run(tmp_path, items, "tiny-ray", "--workers", "1", "--shard-size", "10",
              env={"EMBEDKIT_RAY_STALL_S": "60"})
    kills, deadline = set(), time.monotonic() + 240
    while len(kills) < 5 and run.proc.poll() is None and time.monotonic() < deadline:
        for p in run.watch():  # kill -9 each new actor, five in a row
            try:
                if p.pid not in kills and "_ShardActor" in " ".join(p.cmdline() or []):
                    os.kill(p.pid, signal.SIGKILL)
                    kills.add(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                pass
        time.sleep(0.2)
    code, report, stderr, took = run.finish(timeout=600)
    assert kills, "no actor was seen to kill"
    assert not [line for line in stderr.splitlines() if any(n in line for n in RAY_NOISE)], stderr[-3000:]
    # the outcome depends on which attempts the kills hit; that it ends, and how, does not
    assert report["ok"] + report["failed"] + report["missing"] == report["total"] == 120, report
    stored = stored_once(run.out, "tiny-ray")
    assert len(stored) == report["ok"]
    codes = {f["code"] for f in FeatureStore(run.out).failures("tiny-ray")}
    assert codes <= {"worker_crashed"}, codes
    if code == 0:
        assert report["ok"] == 120
    elif code == 2:
        assert report["failed"] > 0 and report["missing"] == 0
    else:
        assert code == 3 and report["missing"] > 0 and "error: " in stderr, (code, stderr[-3000:])
    print(f"{len(kills)} kills, exit {code}, took {took:.0f} s")
