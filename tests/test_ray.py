"""The Ray Data engine (issue 14): same store as the local engine, exactly once under kill -9 of an
actor or of the driver, a poison item recorded as worker_crashed in bounded time, EmbedBatch, a
private local Ray bound to loopback that leaves nothing running.

One local Ray per module (2 CPUs, fractional CPUs per actor) serves the in-process tests; the CLI
tests start their own through `embedkit extract --engine ray`, as a user does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from support import ROOT, read_banking, run_cli  # noqa: E402

import embedkit  # noqa: E402
from embedkit import FeatureStore  # noqa: E402
from embedkit.errors import RayClusterError  # noqa: E402

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, model_store):
    """One private local Ray for the module, started the way the engine starts it; gone after."""
    import ray_plugin

    from embedkit.features.ray import local_cluster

    log = tmp_path_factory.mktemp("poison") / "attempts.log"
    os.environ["EMBEDKIT_TEST_POISON_LOG"] = str(log)  # before Ray starts: its workers inherit it
    embedkit.register_plugin(ray_plugin, "ray_plugin")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with local_cluster(cpus=2) as started:
        assert started
        children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        yield log
    from embedkit.backbones import registry as plugins

    plugins.reset()  # later modules see the installed plugins only
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"Ray processes left after shutdown: {[p.pid for p in alive]}"


def sorted_store(path: Path, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    ids, X = FeatureStore(path).load(backbone)
    order = np.argsort(ids)
    return ids[order], np.asarray(X)[order]


def test_ray_store_equals_local_store_and_a_rerun_computes_nothing(ray_cluster, tmp_path: Path):
    texts, _ = read_banking("test", limit=300)
    items = texts + texts[:7] + [None, ""]  # duplicates, a bad row, an empty text
    local = embedkit.extract(items, "tiny-ray", tmp_path / "local", shard_size=40)
    ray = embedkit.extract(items, "tiny-ray", tmp_path / "ray", shard_size=40, engine="ray", workers=2)
    for key in ("total", "ok", "failed", "computed", "duplicates", "shards"):
        assert getattr(ray, key) == getattr(local, key), key
    assert ray.ok + ray.failed == ray.total == len(items) and ray.failed == 1
    ids_l, X_l = sorted_store(tmp_path / "local", "tiny-ray")
    ids_r, X_r = sorted_store(tmp_path / "ray", "tiny-ray")
    assert ids_l.tolist() == ids_r.tolist() and len(ids_r) == len(set(items) - {None})
    assert np.abs(X_l - X_r).max() <= 1e-6
    codes = sorted(f["code"] for f in FeatureStore(tmp_path / "ray").failures("tiny-ray"))
    assert codes == sorted(f["code"] for f in FeatureStore(tmp_path / "local").failures("tiny-ray")) == ["not_text"]
    again = embedkit.extract(items, "tiny-ray", tmp_path / "ray", shard_size=40, engine="ray", workers=2)
    assert again.computed == 0 and again.cached == len(items) - 1  # only the bad row is tried again
    info = FeatureStore(tmp_path / "ray").info()[0]
    assert info["shard_rows"] == info["rows"] == len(ids_r)  # every item in exactly one shard


def test_a_poison_item_is_recorded_as_worker_crashed_in_bounded_time(ray_cluster, tmp_path: Path):
    from ray_plugin import MARKER

    texts = [f"message {i} about a card payment" for i in range(40)]
    items = texts[:13] + [f"the {MARKER} over the bank"] + texts[13:]
    start = time.monotonic()
    report = embedkit.extract(items, "tiny-ray-poison", tmp_path / "fs", shard_size=8, engine="ray", workers=2,
                              runtime="torch")
    took = time.monotonic() - start
    assert (report.total, report.ok, report.failed, report.missing) == (41, 40, 1, 0)
    failures = FeatureStore(tmp_path / "fs").failures("tiny-ray-poison")
    assert [(f["source"], f["code"], f["stage"]) for f in failures] == [("item 13", "worker_crashed", "model")]
    ids, _ = sorted_store(tmp_path / "fs", "tiny-ray-poison")
    assert len(ids) == 40 and len(set(ids.tolist())) == 40
    attempts = ray_cluster.read_text().split()
    from embedkit.features.ray import MAX_TASK_RETRIES

    assert 2 <= len(attempts) <= 2 * (1 + MAX_TASK_RETRIES), attempts  # bounded: never retried forever
    assert took < 240, took


def test_embed_batch_adds_columns_and_never_raises_for_a_bad_row(ray_cluster, tmp_path: Path):
    import ray.data

    from embedkit.features.ray import EmbedBatch

    texts = ["a card payment", None, "", "where is my refund", None, "b" * 3]  # None: a missing cell
    ds = ray.data.from_items([{"n": n, "text": t} for n, t in enumerate(texts)])
    out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"backbone": "tiny-ray", "column": "text"},
                         concurrency=1, num_cpus=0.5, batch_size=4).take_all()
    rows = sorted(out, key=lambda r: r["n"])
    assert [bool(r["ok"]) for r in rows] == [True, False, True, True, False, True]
    assert [r["error_code"] for r in rows][1] == "not_text" and rows[4]["error_code"] == "not_text"
    expected = embedkit.embed([t for t in texts if isinstance(t, str)], "tiny-ray").vectors
    got = np.stack([r["embedding"] for r in rows if r["ok"]])
    assert np.abs(got - expected).max() <= 1e-6
    assert np.isnan(rows[1]["embedding"]).all()


def test_an_unreachable_address_is_a_typed_error_naming_it(ray_cluster, tmp_path: Path):
    (tmp_path / "t.txt").write_text("a text\n")  # in process: connected to the module's Ray already
    with pytest.raises(RayClusterError, match="127.0.0.1:9"):
        embedkit.extract(tmp_path / "t.txt", "minilm-l6", tmp_path / "fs", engine="ray", address="127.0.0.1:9")
    done = run_cli("extract", str(tmp_path / "t.txt"), "--out", str(tmp_path / "fs2"), "--engine", "ray",
                   "--address", "127.0.0.1:9", "--no-progress")
    assert done.returncode == 1 and "error: cannot reach the Ray cluster at '127.0.0.1:9'" in done.stderr, done.stderr


# -- the CLI, with its own private Ray, killed at moments that matter -------------------------
def banking_file(tmp_path: Path, n: int) -> tuple[Path, set[str]]:
    from embedkit.inputs.files import content_id

    texts, _ = read_banking("train", limit=n)
    texts = [" ".join(t.split()) for t in texts]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    return source, {content_id(t.encode()) for t in texts}


def start_cli(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedkit.cli", "extract", str(source), "--out", str(out), "--engine", "ray",
         "--workers", "2", "--shard-size", "20", "--no-progress", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)


def wait_for_commits(out: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(out.glob("*/*/commits/*.json"))) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {n} commits: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("no commit in time")


def descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def listening(procs: list) -> list[tuple[str, int, str]]:
    found = []
    for p in procs:
        try:
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((c.laddr.ip, c.laddr.port, p.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_every_item_once(out: Path, expected: set[str]) -> None:
    ids, X = FeatureStore(out).load("minilm-l6")
    assert sorted(ids.tolist()) == sorted(expected)
    info = FeatureStore(out).info()[0]
    assert info["shard_rows"] == info["rows"] == len(expected), info  # no item in two shards


def test_cli_kill_9_of_an_actor_completes_every_item_once_on_loopback_only(minilm, tmp_path: Path):
    source, expected = banking_file(tmp_path, 300)
    out = tmp_path / "fs"
    out.mkdir()
    proc = start_cli(source, out)
    try:
        wait_for_commits(out, 2, proc)
        family = descendants(proc.pid)
        sockets = listening([psutil.Process(proc.pid), *family])
        actors = [p for p in family if "_ShardActor" in " ".join(p.cmdline() or [p.name()])]
        assert actors, [p.name() for p in family]
        os.kill(actors[0].pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert (report["total"], report["ok"], report["failed"], report["missing"]) == (300, 300, 0, 0)
    assert_every_item_once(out, expected)
    assert sockets and all(ip in LOOPBACK for ip, _, _ in sockets), sockets  # nothing bound outside loopback
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]  # no process of the run left


def test_cli_ctrl_c_then_kill_9_of_the_driver_then_rerun_has_every_item_once(minilm, tmp_path: Path):
    # 1,200 items: the run must outlast the moment between its first commit and the signal, even on
    # a loaded machine (with 300 the driver once finished first and exited 0: a race, not a fault)
    n = 1200
    source, expected = banking_file(tmp_path, n)
    out = tmp_path / "fs"
    out.mkdir()
    for sig, commits in ((signal.SIGINT, 1), (signal.SIGKILL, 4)):  # Ctrl-C, then kill -9 later on
        proc = start_cli(source, out)
        try:
            wait_for_commits(out, commits, proc)
            family = descendants(proc.pid)
            finished_first = proc.poll() is not None  # then the signal reaches nothing: only the store is checked
            os.kill(proc.pid, sig)
            proc.wait(timeout=120)
            stderr = proc.stderr.read()
            gone, alive = psutil.wait_procs(family, timeout=60)
            leftover = [(p.pid, p.name()) for p in alive]
            for p in alive:
                p.kill()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if finished_first:
            assert proc.returncode == 0, stderr[-2000:]
            continue
        assert proc.returncode != 0, sig
        if sig == signal.SIGINT:  # one line and exit 130, no traceback; the Ray it started is stopped
            assert proc.returncode == 130 and "error: interrupted (Ctrl-C)" in stderr, stderr[-2000:]
            assert "Traceback" not in stderr, stderr[-2000:]
        assert not leftover, f"Ray processes outlived their driver ({sig.name}): {leftover}"
    rerun = start_cli(source, out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["ok"] == n and report["cached"] + report["computed"] + report["duplicates"] == n
    assert report["cached"] > 0  # the committed shards of the interrupted runs were not computed again
    assert_every_item_once(out, expected)


# -- attacks (a new user's mistakes and interruptions) ------------------------------------------
@pytest.mark.parametrize("batch_format", ["pandas", "pyarrow"])
def test_embed_batch_takes_pandas_and_arrow_batches(ray_cluster, batch_format):
    import ray.data

    from embedkit.features.ray import EmbedBatch

    embedkit.export("tiny-ray")  # the actors find it in the model store (the plugin is the driver's only)
    texts = ["a card payment", None, "where is my refund", "", "b" * 3]
    ds = ray.data.from_items([{"n": n, "text": t} for n, t in enumerate(texts)])
    out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"backbone": "tiny-ray", "column": "text"},
                         concurrency=1, num_cpus=0.5, batch_size=3, batch_format=batch_format).take_all()
    rows = sorted(out, key=lambda r: r["n"])
    assert [bool(r["ok"]) for r in rows] == [True, False, True, True, True]
    assert [r["error_code"] for r in rows] == ["", "not_text", "", "", ""]
    expected = embedkit.embed([t for t in texts if isinstance(t, str)], "tiny-ray").vectors
    got = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows if r["ok"]])
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-6
    assert np.isnan(np.asarray(rows[1]["embedding"], dtype=np.float32)).all()


@pytest.mark.parametrize("address, reason", [("", "empty address"), ("  ", "empty address"),
                                             ("127.0.0.1:99999", "port in 1..65535"),
                                             ("127.0.0.1:0", "port in 1..65535"), (":6379", "HOST:PORT")])
def test_an_empty_or_malformed_address_is_refused_never_read_as_local(ray_cluster, tmp_path: Path, address, reason):
    (tmp_path / "t.txt").write_text("a text\n")
    with pytest.raises(RayClusterError, match=reason):  # in process: a Ray is running, never used silently
        embedkit.extract(tmp_path / "t.txt", "tiny-ray", tmp_path / "fs", engine="ray", address=address)
    assert not list((tmp_path / "fs").glob("*/*/shards/*"))


def test_cli_empty_address_is_an_error_not_a_private_local_ray(minilm, tmp_path: Path):
    (tmp_path / "t.txt").write_text("a text\n")
    (tmp_path / "fs").mkdir()
    done = run_cli("extract", str(tmp_path / "t.txt"), "--out", str(tmp_path / "fs"), "--engine", "ray",
                   "--address", "", "--no-progress", "--json")
    assert done.returncode == 1 and "error: cannot reach the Ray cluster at '': an empty address" in done.stderr, \
        done.stderr
    # --json: the refusal is a JSON object on stdout too (the same message, the same exit status)
    body = json.loads(done.stdout)["error"]
    assert (body["type"], body["exit_code"]) == ("RayClusterError", 1) and f"error: {body['message']}" in done.stderr
    assert not list((tmp_path / "fs").glob("*/*/shards/*"))


CTRL_C_DURING_START = r"""
import signal, sys, time
import psutil, ray
from embedkit.features.ray_cluster import local_cluster

def interrupt(*_):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, interrupt)
signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))  # Ctrl-C while ray.init starts the local Ray
try:
    with local_cluster(cpus=1):
        print("started")  # the interrupt came too late to test anything
except KeyboardInterrupt:
    gone, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)
    print("interrupted", ray.is_initialized(), len(alive))
"""


def test_ctrl_c_while_the_local_ray_starts_leaves_nothing_running(tmp_path: Path):
    done = subprocess.run([sys.executable, "-c", CTRL_C_DURING_START, "1.5"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    if done.stdout.startswith("started"):
        pytest.skip("the local Ray started within 1.5 s: no interrupt during start-up to test")
    assert done.stdout.split() == ["interrupted", "False", "0"], (done.stdout, done.stderr[-2000:])


@pytest.mark.parametrize("option, resource", [({"cpus_per_worker": 4}, "4 CPU"), ({"gpus_per_worker": 1}, "1 GPU")])
def test_an_actor_no_node_can_hold_is_refused_not_waited_for_forever(ray_cluster, tmp_path: Path, option, resource):
    from embedkit.errors import RayResourcesError

    (tmp_path / "t.txt").write_text("a text\n")
    start = time.monotonic()
    with pytest.raises(RayResourcesError, match=f"an actor of {resource} fits no node .* largest has"):
        embedkit.extract(tmp_path / "t.txt", "tiny-ray", tmp_path / "fs", engine="ray", **option)
    assert time.monotonic() - start < 30


def test_cli_cpus_per_worker_above_the_machine_is_an_error_not_a_hang(minilm, tmp_path: Path):
    (tmp_path / "t.txt").write_text("a text\n")
    (tmp_path / "fs").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", "extract", str(tmp_path / "t.txt"), "--out",
                             str(tmp_path / "fs"), "--engine", "ray", "--cpus-per-worker", "64", "--no-progress",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)  # before the fix: waited forever for a 64-CPU node
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "error: an actor of 64 CPU fits no node of the Ray cluster" in stderr, stderr
    assert json.loads(stdout)["error"]["type"] == "RayResourcesError"  # --json: the refusal is JSON on stdout


@pytest.mark.parametrize("option", [{"gpus_per_worker": -0.5}, {"gpus_per_worker": -1}, {"cpus_per_worker": -1},
                                    {"workers": 0}, {"workers": 2.0}, {"cpus_per_worker": float("nan")}])
def test_a_bad_ray_option_value_is_refused_naming_it_before_ray_starts(tmp_path: Path, option):
    (name, value), = option.items()
    (tmp_path / "fs").mkdir()
    with pytest.raises(ValueError, match=f"^{name} must be"):
        embedkit.extract(["a text"], "minilm-l6", tmp_path / "fs", engine="ray", **option)


def test_cli_ray_address_in_the_environment_counts_as_address(minilm, tmp_path: Path):
    (tmp_path / "t.txt").write_text("a text\n")
    (tmp_path / "fs").mkdir()
    done = run_cli("extract", str(tmp_path / "t.txt"), "--out", str(tmp_path / "fs"), "--engine", "ray",
                   "--no-progress", env={"RAY_ADDRESS": "127.0.0.1:9"})
    # before: "cannot reach a local Ray instance: ValueError: When connecting to an existing cluster, num_cpus ..."
    assert done.returncode == 1 and "error: cannot reach the Ray cluster at '127.0.0.1:9'" in done.stderr, done.stderr


LOCAL_ADDRESS = r"""
import psutil
from embedkit.features.ray_cluster import local_cluster

with local_cluster(cpus=1, address="local") as started:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            found += [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    print(started, len(found), sorted(set(found)))
"""


def test_address_local_is_the_private_ray_bound_to_loopback(tmp_path: Path):
    done = subprocess.run([sys.executable, "-c", LOCAL_ADDRESS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    started, count, ips = done.stdout.split(" ", 2)
    assert started == "True" and int(count) > 0, done.stdout + done.stderr[-2000:]
    import ast

    assert set(ast.literal_eval(ips)) <= set(LOOPBACK), ips  # before: '::', '0.0.0.0' and the machine's address


OWN_CHILD = r"""
import subprocess, time
from embedkit.features.ray_cluster import local_cluster

mine = subprocess.Popen(["sleep", "120"])  # the caller's own child, started before the run ...
with local_cluster(cpus=1):
    during = subprocess.Popen(["sleep", "120"])  # ... and during it: neither is Ray's to kill
time.sleep(1.5)
print(mine.poll(), during.poll())
mine.kill(), during.kill()
"""


def test_the_watchdog_never_kills_the_callers_own_processes(tmp_path: Path):
    done = subprocess.run([sys.executable, "-c", OWN_CHILD], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.split() == ["None", "None"], done.stdout + done.stderr[-2000:]  # before: -9 -9
