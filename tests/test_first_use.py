"""First use on a machine: the route measures once within a budget, gates, records, logs; threads
and the tuning key follow the usable cores (affinity and the cgroup CPU quota)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import Pooled, register, text_backbone

import embedkit
from embedkit.encoder import encoder_for
from embedkit.encoders import tuning
from embedkit.models.probes import BF16_LIMITS
from embedkit.runtimes import cpu, records
from embedkit.runtimes.records import device_key, recorded

pytestmark = pytest.mark.usefixtures("no_tuning_records_left")



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return embedkit.export(text_backbone("tiny-first-use", Pooled), tmp_path_factory.mktemp("first-use") / "models")


@pytest.fixture(autouse=True)
def fresh(request):
    """No record of the tiny network before or after a test (its store is not the session's)."""
    if "tiny" in request.fixturenames:
        tiny = request.getfixturevalue("tiny")
        records.path(tiny).unlink(missing_ok=True)
        yield
        records.path(tiny).unlink(missing_ok=True)
    else:
        yield


@pytest.fixture
def quick(monkeypatch):
    """A short first-use measurement: the tiny network's timings mean nothing, the flow does."""
    monkeypatch.setattr(tuning, "FIRST_USE_SECONDS", 0.05)
    monkeypatch.setattr(tuning, "first_use_items", lambda artifact: ["a card payment", "my top-up failed"] * 8)


def test_first_use_measures_once_records_and_logs_one_line(tiny, first_use_tuning, quick, caplog):
    assert recorded(tiny, "cpu") is None
    with caplog.at_level(logging.INFO, logger="embedkit"):
        encoder = encoder_for(tiny)
    record = recorded(tiny, "cpu")
    assert record is not None and record["mode"] == "first use" and record["budget_s"] == tuning.FIRST_USE_BUDGET
    assert record["device"] == device_key("cpu") and f":{cpu.cpu_count()} cores" in record["device"]
    assert list(record["candidates"])[0] == "onnxruntime"  # the reference goes first, torch last
    assert encoder.runtime.providers == record["candidates"][record["choice"]]["providers"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("first use of")]
    assert len(lines) == 1 and record["choice"] in lines[0] and "budget" in lines[0] and "s (" in lines[0]
    assert record["seconds_spent"] > 0

    # Measured once: a second encoder (and a second process) reuses the record.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedkit"):
        encoder_for(tiny)
    assert not any("first use of" in r.getMessage() for r in caplog.records)
    script = ("import json, sys, logging, embedkit\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "from embedkit.encoder import encoder_for\n"
              "rt = encoder_for(embedkit.Artifact.open(sys.argv[1])).runtime\n"
              "print(json.dumps(rt.providers))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tiny.path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "EMBEDKIT_TUNE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "first use of" not in done.stderr and "measuring the candidates" not in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == record["candidates"][record["choice"]]["providers"]


def test_the_budget_bounds_the_measurement(tiny, first_use_tuning, quick, monkeypatch):
    monkeypatch.setattr(tuning, "FIRST_USE_BUDGET", 0.0)  # spent at once: only the reference runs
    encoder_for(tiny)
    record = recorded(tiny, "cpu")
    rows = record["candidates"]
    assert record["choice"] == "onnxruntime" and rows["onnxruntime"]["passes"]
    assert len(rows) > 1 and all("skipped" in row and not row["passes"] for k, row in rows.items() if k != "onnxruntime")
    assert any("not measured" in line for line in tuning.tune_table(record))


def test_a_candidate_slower_than_the_best_by_the_margin_is_cut_short():
    calls = []

    class Slow:
        def encode(self, part):
            calls.append(len(part))
            import time

            time.sleep(0.02 * len(part) / 8)

            class Rows:
                ok = [True] * len(part)
                vectors = __import__("numpy").zeros((len(part), 2))

            return Rows()

    rate, rows, cut = tuning._rate(Slow(), list(range(64)), seconds=10.0, chunk=8, passes=1, floor=1e6)
    assert cut and "margin" in cut and len(rows.ok) == 8  # stopped after its first chunk, not 10 s
    assert sum(calls) <= 8 + 8  # the warm-up and one chunk


@pytest.mark.parametrize("how", ["env", "parameter"])
def test_the_opt_out_keeps_onnx_runtime_and_measures_nothing(tiny, monkeypatch, how):
    monkeypatch.setenv("EMBEDKIT_TUNE", "0" if how == "env" else "1")
    calls = []
    monkeypatch.setattr(tuning, "tune", lambda *a, **k: calls.append(a))
    encoder = encoder_for(tiny, tune=False) if how == "parameter" else encoder_for(tiny)
    assert calls == [] and recorded(tiny, "cpu") is None
    assert isinstance(encoder.runtime, embedkit.Runtime)
    assert tuning.first_use_enabled(None) == (how != "env")


def test_first_use_never_picks_a_candidate_that_fails_the_gate(tmp_path, first_use_tuning, quick, monkeypatch):
    """The fp32-range network (a signal riding on a bias of 256): bf16 fails the gate by far. Made
    to look 1,000x faster, it is still not chosen."""
    pytest.importorskip("openvino")
    from test_openvino import Cancelling

    from embedkit.backbones import registry as plugins

    backbone = text_backbone("cancelling-first-use", Cancelling)
    register(backbone)
    try:
        artifact = embedkit.export(backbone, tmp_path / "models")
        monkeypatch.setattr(tuning, "candidates_for", lambda device, a: ("onnxruntime", "torch-bf16", "openvino"))
        real = tuning._rate

        def flattering(encoder, *args, **kwargs):
            rate, rows, cut = real(encoder, *args, **{**kwargs, "floor": None})
            return rate * (1000 if encoder.runtime.precision == "bf16" else 1), rows, cut

        monkeypatch.setattr(tuning, "_rate", flattering)
        runtime = encoder_for(artifact).runtime
    finally:
        plugins.reset()
    record = recorded(artifact, "cpu")
    rows = record["candidates"]
    assert rows["torch-bf16"]["precision"] == "bf16" and not rows["torch-bf16"]["passes"]
    assert rows["torch-bf16"]["sample"]["min_cosine"] < BF16_LIMITS["min_cosine"]
    assert rows["torch-bf16"]["items_per_s"] == max(r["items_per_s"] for r in rows.values() if "items_per_s" in r)
    assert record["choice"] in ("onnxruntime", "openvino") and record["precision"] == "fp32"
    assert runtime.precision == "fp32"


def test_a_record_from_another_core_count_is_not_reused(tiny, monkeypatch):
    record = embedkit.tune(tiny, items=["a card payment"] * 8, seconds=0.01, runtimes=("onnxruntime",))
    records.save(tiny, {**record, "choice": "openvino"})  # as if measured so on this device
    assert recorded(tiny, "cpu")["choice"] == "openvino"
    here = cpu.cpu_count()
    monkeypatch.setattr(records, "cpu_count", lambda: here + 14)  # the same machine, other usable cores
    assert device_key("cpu") != record["device"] and recorded(tiny, "cpu") is None
    assert isinstance(encoder_for(tiny, tune=False).runtime, embedkit.Runtime)  # not the other key's choice


# --- usable cores: the cgroup CPU quota (v1 and v2) and affinity ------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_cpu_max_is_read_along_the_hierarchy(tmp_path):
    _write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    root = tmp_path / "sys"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "kubepods/pod1/cpu.max", "250000 100000\n")  # the pod: 2.5 CPUs
    _write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")  # the container: no limit of its own
    assert cpu._cgroup_quota(str(tmp_path / "proc"), str(root)) == 2.5
    _write(root / "kubepods/pod1/ctr/cpu.max", "50000 100000\n")
    assert cpu._cgroup_quota(str(tmp_path / "proc"), str(root)) == 0.5
    _write(root / "kubepods/pod1/cpu.max", "max 100000\n")
    _write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    assert cpu._cgroup_quota(str(tmp_path / "proc"), str(root)) is None


def test_cgroup_v1_cfs_quota_is_read(tmp_path):
    _write(tmp_path / "proc", "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = tmp_path / "sys" / "cpu,cpuacct" / "docker" / "abc"
    _write(folder / "cpu.cfs_quota_us", "100000\n")
    _write(folder / "cpu.cfs_period_us", "100000\n")
    assert cpu._cgroup_quota(str(tmp_path / "proc"), str(tmp_path / "sys")) == 1.0
    _write(folder / "cpu.cfs_quota_us", "-1\n")
    assert cpu._cgroup_quota(str(tmp_path / "proc"), str(tmp_path / "sys")) is None
    assert cpu._cgroup_quota(str(tmp_path / "missing"), str(tmp_path / "sys")) is None


def test_cpu_count_is_affinity_bounded_by_the_quota_rounded_up(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: None)
    assert cpu.cpu_count() == cores
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 0.5)
    assert cpu.cpu_count() == 1
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 1000.0)
    assert cpu.cpu_count() == cores  # a quota above the cores allowed does not add any
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 1.2)
    assert cpu.cpu_count() == min(cores, 2)


ONE_CPU = textwrap.dedent("""
    import json, os, sys
    how, target = sys.argv[1], sys.argv[2]
    if how == "cgroup":
        with open(target, "w") as f:  # join the test's cgroup (quota: 1 CPU) before anything starts threads
            f.write(str(os.getpid()))
    else:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import embedkit
    from embedkit.runtimes import cpu
    from embedkit.runtimes.records import device_key
    rt = embedkit.Runtime(sys.argv[3])
    seen = {"cpu_count": cpu.cpu_count(), "quota": cpu._cgroup_quota(), "ort": [rt.threads, rt.streams],
            "key": device_key("cpu")}
    try:
        from embedkit.runtimes.openvino_runtime import OpenVINORuntime
        ov = OpenVINORuntime(embedkit.Artifact.open(sys.argv[4]), "fp32", cache=False)
        seen["openvino"] = [ov.threads, ov.streams]
    except ImportError:
        pass
    print(json.dumps(seen))
""")


def _one_cpu_cgroup() -> Path | None:
    """A cgroup of this test's own with a quota of 1 CPU (v1 ``cpu`` controller or v2), or None
    where the machine does not let this process make one."""
    name = f"embedkit-test-{os.getpid()}"
    for folder, files in ((Path("/sys/fs/cgroup/cpu") / name, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}),
                          (Path("/sys/fs/cgroup") / name, {"cpu.max": "100000 100000"})):
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            for file, value in files.items():
                (folder / file).write_text(value)
            return folder
        except OSError:
            folder.rmdir()
    return None


def test_a_quota_of_one_cpu_gives_one_intra_op_thread(tiny, tmp_path):
    group = _one_cpu_cgroup()
    how, target = ("cgroup", str(group / "cgroup.procs")) if group else ("affinity", "")
    try:
        done = subprocess.run([sys.executable, "-c", ONE_CPU, how, target, str(tiny.onnx_path), str(tiny.path)],
                              capture_output=True, text=True, timeout=300)
    finally:
        if group is not None:
            group.rmdir()  # the process has exited: the cgroup is empty
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["cpu_count"] == 1 and seen["ort"] == [1, 1], (how, seen)
    assert seen["key"].endswith(":1 cores")  # and the tuning key says so: records of 2 cores are not reused
    if "openvino" in seen:
        assert seen["openvino"] == [1, 1]
    if how == "cgroup":
        assert seen["quota"] == 1.0


@pytest.mark.parametrize("faster,expected", [(1.05, "onnxruntime"), (1.5, "openvino")])
def test_first_use_leaves_onnx_runtime_only_for_a_clear_gain(tiny, first_use_tuning, quick, monkeypatch,
                                                               faster, expected):
    pytest.importorskip("openvino")
    monkeypatch.setattr(tuning, "candidates_for", lambda device, a: ("onnxruntime", "openvino"))
    real = tuning._rate

    def fixed(encoder, *args, **kwargs):  # timings made deterministic: only the rule is tested
        _, rows, cut = real(encoder, *args, **kwargs)
        return 100.0 * (faster if encoder.runtime.providers[0].startswith("openvino") else 1.0), rows, cut

    monkeypatch.setattr(tuning, "_rate", fixed)
    encoder_for(tiny)
    record = recorded(tiny, "cpu")
    assert record["candidates"]["openvino"]["passes"] and record["choice"] == expected
