"""The command line's contract: every bad value is one `error:` line and exit 1 (2 means "items failed").

Each case runs the real `embedkit` in a subprocess; none needs a model (values are refused first).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from support import run_cli

import embedkit
import embedkit.cli

MISSING = "/nonexistent/embedkit-test/path"


def cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(case id, argv, what the error line must name). ``tmp`` holds a real file and folder."""
    f, d = str(tmp / "t.txt"), str(tmp)
    return [
        ("no-command", [], "required: command"),
        ("unknown-command", ["bogus"], "invalid choice"),
        ("embed-threads-0", ["embed", "minilm-l6", f, "--out", d + "/o.npy", "--threads", "0"], "--threads"),
        ("embed-batch-neg", ["embed", "minilm-l6", f, "--out", d + "/o.npy", "--batch-size", "-1"], "--batch-size"),
        ("embed-workers-0", ["embed", "minilm-l6", f, "--out", d + "/o.npy", "--workers", "0"], "--workers"),
        ("embed-pixels-x", ["embed", "minilm-l6", f, "--out", d + "/o.npy", "--max-pixels", "many"], "--max-pixels"),
        ("embed-missing-input", ["embed", "minilm-l6", MISSING, "--out", d + "/o.npy"], MISSING),
        ("embed-missing-relative", ["embed", "minilm-l6", "no-such-input.txt", "--out", d + "/o.npy"],
         f"no-such-input.txt: no such file or folder (relative paths are taken from {Path.cwd()})"),
        ("embed-no-out", ["embed", "minilm-l6", f], "--out"),
        ("embed-bad-device", ["embed", "minilm-l6", f, "--out", d + "/o.npy", "--device", "tpu"], "--device"),
        ("extract-shard-neg", ["extract", f, "--out", d + "/fs", "--shard-size", "-5"], "--shard-size"),
        ("extract-shard-0", ["extract", f, "--out", d + "/fs", "--shard-size", "0"], "--shard-size"),
        ("extract-max-failures-neg", ["extract", f, "--out", d + "/fs", "--max-failures", "-1"], "--max-failures"),
        ("extract-threads-1.5", ["extract", f, "--out", d + "/fs", "--threads", "1.5"], "--threads"),
        ("extract-missing-source", ["extract", MISSING + ".csv", "--out", d + "/fs"], MISSING),
        ("extract-bad-engine", ["extract", f, "--out", d + "/fs", "--engine", "spark"], "--engine"),
        ("extract-cpus-per-worker-0", ["extract", f, "--out", d + "/fs", "--engine", "ray", "--cpus-per-worker", "0"],
         "--cpus-per-worker"),
        ("extract-gpus-per-worker-neg", ["extract", f, "--out", d + "/fs", "--engine", "ray", "--gpus-per-worker",
                                         "-1"], "--gpus-per-worker"),
        ("extract-ray-workers-0", ["extract", f, "--out", d + "/fs", "--engine", "ray", "--workers", "0"], "--workers"),
        ("extract-address-without-ray", ["extract", f, "--out", d + "/fs", "--address", "10.0.0.1:6379"],
         "--address apply to --engine ray"),
        ("store-missing", ["store", "info", MISSING], MISSING),
        ("store-bad-action", ["store", "explode", d], "invalid choice"),
        ("store-failures-file", ["store", "failures", f], "a folder is expected"),
        ("train-head-cv-1", ["train-head", d, "--labels", f, "--out", d + "/r", "--cv", "1"], "--cv"),
        ("train-head-test-size", ["train-head", d, "--labels", f, "--out", d + "/r", "--test-size", "1.5"],
         "--test-size"),
        ("train-head-missing-labels", ["train-head", d, "--labels", MISSING, "--out", d + "/r"], MISSING),
        ("train-head-missing-store", ["train-head", MISSING, "--labels", f, "--out", d + "/r"], MISSING),
        ("train-head-bad-head", ["train-head", d, "--labels", f, "--out", d + "/r", "--head", "forest"], "--head"),
        ("finetune-epochs-0", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--epochs", "0"], "--epochs"),
        ("finetune-lr-neg", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--lr", "-1"], "--lr"),
        ("finetune-unfreeze-0", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--unfreeze", "last:0"],
         "--unfreeze"),
        ("finetune-unfreeze-word", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--unfreeze", "top"],
         "--unfreeze"),
        ("finetune-layer-decay", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--layer-decay", "1.5"],
         "--layer-decay"),
        ("finetune-warmup", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--warmup", "1.5"], "--warmup"),
        ("finetune-validation", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--validation", "1"],
         "--validation"),
        ("finetune-every-0", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--checkpoint-every", "0"],
         "--checkpoint-every"),
        ("finetune-device", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--device", "tpu"], "--device"),
        ("finetune-missing-source", ["finetune", "minilm-l6", MISSING, "--labels", f, "--out", d + "/ft"], MISSING),
        ("finetune-missing-labels", ["finetune", "minilm-l6", f, "--labels", MISSING, "--out", d + "/ft"], MISSING),
        ("finetune-no-out", ["finetune", "minilm-l6", f, "--labels", f], "--out"),
        ("finetune-iterations", ["finetune", "minilm-l6", f, "--labels", f, "--out", d + "/ft", "--iterations", "5"],
         "--iterations"),
        ("predict-missing-model", ["predict", MISSING, "hello"], MISSING),
        ("predict-missing-input", ["predict", d, "--input", MISSING], MISSING),
        ("index-budget-0", ["index", d, "--out", d + "/ix", "--memory-budget-mb", "0"], "--memory-budget-mb"),
        ("index-missing", ["index", MISSING, "--out", d + "/ix"], MISSING),
        ("search-k-0", ["search", d, "query", "-k", "0"], "-k"),
        ("search-k-neg", ["search", d, "query", "-k", "-3"], "-k"),
        ("search-no-query", ["search", d], "queries"),
        ("report-repeats-0", ["report", d, "--labels", f, "--out", d + "/r", "--repeats", "0"], "--repeats"),
        ("report-missing-labels", ["report", d, "--labels", MISSING, "--out", d + "/r"], MISSING),
        ("report-bad-finetune", ["report", d, "--labels", f, "--out", d + "/r", "--finetune", "x"], "--finetune"),
        ("report-finetune-max-0", ["report", d, "--labels", f, "--out", d + "/r", "--finetune-max-items", "0"],
         "--finetune-max-items"),
        ("report-iterations-0", ["report", d, "--labels", f, "--out", d + "/r", "--iterations", "0"], "--iterations"),
        ("tune-limit-0", ["tune", "minilm-l6", "--limit", "0"], "--limit"),
        ("tune-seconds-neg", ["tune", "minilm-l6", "--seconds", "-1"], "--seconds"),
        ("tune-seconds-nan", ["tune", "minilm-l6", "--seconds", "nan"], "--seconds"),
        ("tune-runtime-unknown", ["tune", "minilm-l6", "--runtime", "openvino-int4"], "openvino-int4"),
        ("tune-missing-data", ["tune", "minilm-l6", "--data", MISSING], MISSING),
        ("quantize-limit-neg", ["quantize", "minilm-l6", "--limit", "-2"], "--limit"),
        ("quantize-missing-data", ["quantize", "minilm-l6", "--report", "--data", MISSING], MISSING),
        ("quantize-bad-variant", ["quantize", "minilm-l6", "--variant", "int4"], "--variant"),
        ("export-bad-exporter", ["export", "minilm-l6", "--exporter", "x"], "--exporter"),
        ("backbones-extra", ["backbones", "extra"], "unrecognized arguments"),
        ("serve-port-neg", ["serve", "--port", "-1"], "--port"),
        ("serve-max-queue-0", ["serve", "--max-queue", "0"], "--max-queue"),
        ("serve-wait-nan", ["serve", "--max-wait-ms", "nan"], "--max-wait-ms"),
        ("serve-missing-key-file", ["serve", "--api-key-file", MISSING], MISSING),
    ]


IDS = [c[0] for c in cases(Path("/tmp"))]


@pytest.mark.parametrize("case", IDS)
def test_every_bad_value_is_one_error_line_and_exit_1(case: str, tmp_path: Path):
    (tmp_path / "t.txt").write_text("a text\n")
    argv, named = next((a, n) for i, a, n in cases(tmp_path) if i == case)
    done = run_cli(*argv)
    assert done.returncode == 1, (case, done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], done.stderr
    assert done.stdout == ""
    # a refused command writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_every_subcommand_is_covered_by_a_bad_value_case():
    covered = {argv[0] for _, argv, _ in cases(Path("/tmp")) if argv}
    missing = set(embedkit.cli.COMMANDS) - covered - {"plugins", "check", "demo"}  # these take no value to get wrong
    assert not missing, missing


def test_in_process_main_returns_1_instead_of_exiting(capsys):
    assert embedkit.cli.main(["search", "/tmp", "q", "-k", "0"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: embedkit search: argument -k: expected a positive integer (>= 1), got 0"
    assert err.startswith("usage: embedkit search")


def test_help_still_exits_0():
    done = run_cli("search", "--help")
    assert done.returncode == 0 and "neighbours per query (default 10)" in done.stdout


@pytest.mark.parametrize("command", ["train-head", "index", "report"])
def test_backbone_option_says_its_default(command: str):
    text = " ".join(run_cli(command, "--help").stdout.split())
    assert "--backbone BACKBONE" in text and "(default: the store's only backbone" in text


def test_the_library_refuses_zero_instead_of_reading_it_as_the_default(minilm, tmp_path: Path):
    import numpy as np

    from embedkit.encoder import encoder_for
    from embedkit.heads.training import evaluate, holdout_split, learning_curve

    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        embedkit.extract(["a", "b"], minilm, tmp_path / "fs", shard_size=0)
    assert not (tmp_path / "fs").exists()  # refused before the store is touched
    with pytest.raises(ValueError, match="batch_tokens must be a positive int"):
        encoder_for(minilm, batch_tokens=0)
    X, y = np.eye(6, dtype=np.float32), np.array(list("aabbcc"))
    with pytest.raises(ValueError, match="cv must be 0"):
        evaluate(X, y, "logreg", {}, cv=1)
    with pytest.raises(ValueError, match="test_size must be a fraction"):
        holdout_split(y, 0.0)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        learning_curve(X, X, y, "image", repeats=0)
