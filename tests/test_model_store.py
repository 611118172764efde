"""One model store per user, and saved models that find their backbone from any folder.

Every process here is a real subprocess started in a folder other than the checkout. Processes
without ``EMBEDKIT_HOME`` get ``XDG_CACHE_HOME`` pointed at a test folder, so "the user cache
folder" is one the test owns (platformdirs puts it at ``$XDG_CACHE_HOME/embedkit`` on Linux).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT
from test_onnx_backbones import TOKENIZER, write_graph

TEST_CACHE = ROOT / "models" / ".test-cache"  # tests/conftest.py sets EMBEDKIT_HOME to its embedkit/ folder
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_CACHE_HOME is the Linux cache folder")


def user_env(cache: Path) -> dict[str, str]:
    """The environment of a user with no EMBEDKIT_HOME whose cache folder is ``cache``."""
    env = {k: v for k, v in os.environ.items() if k != "EMBEDKIT_HOME"}
    env["XDG_CACHE_HOME"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def artifacts(store: Path, name: str | None = None) -> list[Path]:
    return sorted(p.parent for p in store.glob(f"{name or '*'}/*/model.onnx") if not p.parent.name.startswith("."))


@linux_only
def test_the_store_is_the_user_cache_folder_not_the_working_directory(tmp_path):
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    env = user_env(tmp_path / "cache")
    done = python("from embedkit.fs.home import default_root; print(default_root())", cwd, env)
    assert done.stdout.strip() == str(tmp_path / "cache" / "embedkit"), done.stderr
    helped = subprocess.run([sys.executable, "-m", "embedkit.cli", "--help"], capture_output=True, text=True, cwd=cwd, env=env)
    assert f"model store: {tmp_path / 'cache' / 'embedkit'} (user cache folder" in helped.stdout
    listed = subprocess.run([sys.executable, "-m", "embedkit.cli", "backbones"], capture_output=True, text=True, cwd=cwd, env=env)
    assert listed.stdout.splitlines()[0] == f"model store: {tmp_path / 'cache' / 'embedkit'} (user cache folder; set $EMBEDKIT_HOME to move it)"
    moved = subprocess.run([sys.executable, "-m", "embedkit.cli", "backbones"], capture_output=True, text=True, cwd=cwd,
                           env={**env, "EMBEDKIT_HOME": str(tmp_path / "home")})
    assert moved.stdout.splitlines()[0] == f"model store: {tmp_path / 'home'} ($EMBEDKIT_HOME)"
    assert not (cwd / "models").exists()


@linux_only
def test_readme_example_from_two_folders_and_two_processes_exports_once(model_store, tmp_path):
    """The README's usage example, run as a new user would: from two folders outside the checkout,
    in two processes. One export in total (none if the test run's store already holds MiniLM)."""
    assert model_store == TEST_CACHE / "embedkit"  # what $XDG_CACHE_HOME/embedkit will be below
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme.split("## Using it", 1)[1], re.S)[0]
    logged = "import logging\nlogging.basicConfig(level=logging.INFO, format='LOG %(name)s: %(message)s')\n"
    before = artifacts(model_store, "minilm-l6")
    runs = []
    for folder in ("first", "second"):
        cwd = tmp_path / folder
        cwd.mkdir()
        done = python(logged + code, cwd, user_env(TEST_CACHE))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "['card_arrival']" in done.stdout and "[(1, 'not_text'), (2, 'invalid_utf8')]" in done.stdout
        assert not (cwd / "models").exists()
        runs.append(len(re.findall(r"LOG embedkit.models.exporter: exported minilm-l6 ", done.stderr)))
    after = artifacts(model_store, "minilm-l6")
    assert runs[1] == 0 and sum(runs) <= 1 and sum(runs) == len(after) - len(before)
    assert len(after) - len(before) <= 1


# -- saved models ------------------------------------------------------------------------------
SAVE = """
import sys
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
import embedkit
texts = ["I still have not received my card", "What is the exchange rate?",
         "my card has not arrived yet", "how much is one euro in dollars"]
labels = ["card_arrival", "exchange_rate", "card_arrival", "exchange_rate"]
pipe = Pipeline([("embed", embedkit.Embedder(sys.argv[1])), ("head", LogisticRegression(C=100))]).fit(texts, labels)
embedkit.save(pipe, sys.argv[2])
print("DIGEST", pipe[0].digest_)
"""
PREDICT = "import sys, embedkit\nprint('PRED', embedkit.load(sys.argv[1]).predict(['where is my new card?', 'euro to dollar rate']).tolist())\n"


def onnx_folder(root: Path) -> Path:
    """A backbone given by path: an ONNX-only folder (exports in a second, without torch)."""
    root.mkdir()
    write_graph(root / "model.onnx")
    shutil.copyfile(TOKENIZER, root / "tokenizer.json")
    (root / "embedkit.json").write_text('{"name": "portable", "output": "pooled"}')
    return root


@pytest.fixture
def saved(tmp_path):
    """A model saved from folder A by a user whose cache is ``cache``; returns (model, backbone folder, digest)."""
    a = tmp_path / "a"
    (a / "run").mkdir(parents=True)  # save refuses a missing parent folder (outputs are checked before any work)
    backbone = onnx_folder(tmp_path / "backbone")
    done = subprocess.run([sys.executable, "-c", SAVE, str(backbone), "run/model"], capture_output=True, text=True,
                          cwd=a, env=user_env(tmp_path / "cache"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    digest = done.stdout.split("DIGEST ")[1].split()[0]
    return a / "run" / "model", backbone, digest


def predict_from(cwd: Path, model: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", PREDICT, str(model)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@linux_only
def test_a_saved_model_finds_its_backbone_by_digest_from_another_folder(saved, tmp_path):
    model, _, digest = saved
    env = user_env(tmp_path / "cache")
    done = predict_from(tmp_path / "b", model, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PRED ['card_arrival', 'exchange_rate']" in done.stdout
    assert [p.name for p in artifacts(tmp_path / "cache" / "embedkit")] == [digest]  # found, not exported again
    cli = subprocess.run([sys.executable, "-m", "embedkit.cli", "predict", str(model), "where is my new card?"],
                         capture_output=True, text=True, cwd=tmp_path / "b", env=env, timeout=600)
    assert cli.returncode == 0 and "card_arrival" in cli.stdout, cli.stderr[-2000:]


@linux_only
def test_a_saved_model_re_exports_its_backbone_when_that_gives_the_same_digest(saved, tmp_path):
    model, _, digest = saved
    env = {**user_env(tmp_path / "cache"), "EMBEDKIT_HOME": str(tmp_path / "empty-store")}
    done = predict_from(tmp_path / "c", model, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PRED ['card_arrival', 'exchange_rate']" in done.stdout
    assert [p.name for p in artifacts(tmp_path / "empty-store")] == [digest]


@linux_only
def test_a_missing_backbone_is_named_and_no_other_backbone_is_kept(saved, tmp_path):
    model, backbone, digest = saved
    # The recorded backbone now exports to another digest (its declaration changed).
    (backbone / "embedkit.json").write_text('{"name": "portable", "output": "pooled", "normalize": true}')
    store = tmp_path / "fresh-store"
    env = {**user_env(tmp_path / "cache"), "EMBEDKIT_HOME": str(store)}
    done = predict_from(tmp_path / "d", model, env)
    assert done.returncode != 0
    assert "BackboneNotAvailableError" in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert digest in message and str(store) in message and "copy the folder" in message
    assert "now gives artifact" in message  # why the re-export was refused
    assert artifacts(store) == [] and not list(store.rglob("*"))  # no foreign artifact, nor any trace, left behind
    # The CLI says the same, exit 1; and with the backbone gone entirely, says that.
    shutil.rmtree(backbone)
    cli = subprocess.run([sys.executable, "-m", "embedkit.cli", "predict", str(model), "where is my card?"],
                         capture_output=True, text=True, cwd=tmp_path / "d", env=env, timeout=600)
    assert cli.returncode == 1
    assert digest in cli.stderr and "is not a backbone here" in cli.stderr and "embedkit export portable" in cli.stderr
    assert artifacts(store) == []


# -- embedkit backbones: exports and variants, with their parent --------------------------------
def test_backbones_lists_exports_and_variants_with_their_parent(minilm, tmp_path):
    import json

    from embedkit.models.precision import half
    from embedkit.models.quantization import quantize

    store = tmp_path / "store"
    shutil.copytree(minilm.path, store / "minilm-l6" / minilm.digest)
    base = embedkit_open(store / "minilm-l6" / minilm.digest)
    int8 = quantize(base, "dynamic", store=str(store))
    fp16 = half(base, str(store))
    done = subprocess.run([sys.executable, "-m", "embedkit.cli", "backbones", "--models", str(store)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"model store: {store} (--models)"
    at = next(i for i, l in enumerate(lines) if l.startswith("minilm-l6 "))
    block = lines[at + 1:at + 4]
    assert block[0].split()[:2] == ["exported", minilm.digest[:12]]
    variants = {l.split()[1]: l.split() for l in block[1:]}
    assert variants[int8.name][2:] == ["int8-dynamic", int8.digest[:12], "parent", minilm.digest[:12]]
    assert variants[fp16.name][2:] == ["fp16", fp16.digest[:12], "parent", minilm.digest[:12]]
    rows = {r["name"]: r for r in json.loads(subprocess.run(
        [sys.executable, "-m", "embedkit.cli", "backbones", "--json", "--store", str(store)],
        capture_output=True, text=True, timeout=300).stdout)}
    row = rows["minilm-l6"]
    assert [a["digest"] for a in row["exported"]] == [minilm.digest]
    assert {(v["name"], v["kind"], v["digest"], v["parent"], v["parent_name"]) for v in row["variants"]} == {
        (int8.name, "int8-dynamic", int8.digest, minilm.digest, "minilm-l6"),
        (fp16.name, "fp16", fp16.digest, minilm.digest, "minilm-l6"),
    }


def embedkit_open(path: Path):
    import embedkit

    return embedkit.Artifact.open(path)


def test_one_graph_stored_under_two_names_is_still_found_by_digest(tmp_path):
    """The same ONNX file imported as a folder and by a plugin (two names, one digest) made
    every saved model of that digest fail to load: 'no single artifact ... (2 found)'."""
    import json

    import embedkit
    from embedkit.models.store import ModelStore

    store = tmp_path / "store"
    digests = []
    for name in ("first-name", "second-name"):
        folder = tmp_path / name
        folder.mkdir()
        write_graph(folder / "model.onnx")
        shutil.copy(TOKENIZER, folder / "tokenizer.json")
        (folder / "embedkit.json").write_text(json.dumps({"name": name, "output": "pooled", "pooled": True}))
        digests.append(embedkit.resolve(str(folder), store=store).digest)
    assert digests[0] == digests[1] and len(list(store.glob("*/*/model.onnx"))) == 2
    assert ModelStore(store).get(digests[0]).digest == digests[0]
    assert ModelStore(store).get(digests[0][:12]).digest == digests[0]


@linux_only
def test_a_backbone_given_by_relative_path_is_recorded_absolute_and_re_exported_from_elsewhere(tmp_path):
    a = tmp_path / "a"
    (a / "run").mkdir(parents=True)
    onnx_folder(tmp_path / "backbone")
    done = subprocess.run([sys.executable, "-c", SAVE, "../backbone", "run/model"], capture_output=True, text=True,
                          cwd=a, env=user_env(tmp_path / "cache"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    digest = done.stdout.split("DIGEST ")[1].split()[0]
    recorded = json.loads((a / "run" / "model" / "model.json").read_text())["backbone"]["spec"]
    assert recorded == str(tmp_path / "backbone")  # was "../backbone": meaningless from another folder
    env = {**user_env(tmp_path / "cache"), "EMBEDKIT_HOME": str(tmp_path / "empty-store")}
    done = predict_from(tmp_path / "elsewhere", a / "run" / "model", env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in artifacts(tmp_path / "empty-store")] == [digest]


def test_staging_of_a_killed_export_is_swept_and_nothing_else(tmp_path):
    """An export killed mid-write leaves ``.tmp-<pid>-<random>`` in the store (issue 23's attack: a
    45 MB model.onnx stayed for good). The next staging in that folder removes the folders of dead
    processes it made, and keeps a live process's staging and any folder of another shape."""
    from embedkit.models.store import ModelStore

    store = tmp_path / "models"
    child = ("import os, sys\nfrom embedkit.models.store import ModelStore\n"
             "folder = ModelStore(sys.argv[1]).staging('tuned')\n"
             "(folder / 'model.onnx').write_bytes(b'x' * 4096)\nprint(folder)\nsys.stdout.flush()\nos._exit(9)\n")
    out = subprocess.run([sys.executable, "-c", child, str(store)], capture_output=True, text=True, timeout=120)
    dead = Path(out.stdout.strip())
    assert out.returncode == 9 and (dead / "model.onnx").is_file()
    mine = store / "tuned" / ".tmp-notes"  # not of the shape staging makes: never touched
    mine.mkdir()
    live = ModelStore(store).staging("tuned")  # this process is alive: its folder stays
    again = ModelStore(store).staging("tuned")
    assert not dead.exists()
    assert live.is_dir() and again.is_dir() and mine.is_dir()
    assert re.fullmatch(rf"\.tmp-{os.getpid()}-[0-9a-f]{{32}}", live.name)
