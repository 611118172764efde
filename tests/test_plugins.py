"""Plugin loading: entry points, EMBEDKIT_LOAD_PLUGINS, isolation of broken plugins, duplicates."""
import pytest

import embedkit
from embedkit.backbones import registry as plugins
from embedkit_text import minilm_folder


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    plugins.reset()
    yield
    monkeypatch.delenv("EMBEDKIT_LOAD_PLUGINS", raising=False)
    plugins.reset()


def _backbone(name, dim=8):
    return embedkit.Backbone(
        name=name, modality="text", dim=dim, weights="none", license="MIT",
        preprocess=embedkit.TextPreprocess(tokenizer=str(minilm_folder() / "tokenizer.json")),
        builder=lambda: None,
    )


def test_builtin_backbone_arrives_through_the_entry_point():
    report = {p.name: p for p in embedkit.plugin_report()}
    assert report["text"].distribution == "embedkit-text"
    assert report["text"].version == "0.1.0" and report["text"].ok
    assert "minilm-l6" in report["text"].backbones
    assert report["vision"].distribution == "embedkit-vision" and report["vision"].ok
    assert report["vision"].backbones == ["mobilenet-v2", "efficientnet-lite0"]
    # First-party plugins' backbones, sorted (the ONNX-only example plugin, installed by make, adds its own).
    extra = report["paraphrase_onnx"].backbones if "paraphrase_onnx" in report else []
    assert extra in ([], ["paraphrase-minilm-l3"])
    assert [b.name for b in embedkit.list_backbones()] == sorted(["efficientnet-lite0", "minilm-l6", "mobilenet-v2"] + extra)


def test_load_plugins_env_restricts(monkeypatch):
    monkeypatch.setenv("EMBEDKIT_LOAD_PLUGINS", "")
    plugins.reset()
    assert embedkit.list_backbones() == []
    with pytest.raises(embedkit.UnknownBackboneError, match="none"):
        embedkit.get_backbone("minilm-l6")
    monkeypatch.setenv("EMBEDKIT_LOAD_PLUGINS", "text")
    plugins.reset()
    assert [b.name for b in embedkit.list_backbones()] == ["minilm-l6"]


def test_misspelt_hook_is_reported_and_others_keep_working():
    class Misspelt:
        @embedkit.hookimpl
        def register_backbone(self, register):  # missing "s"
            register(_backbone("never"))

    info = embedkit.register_plugin(Misspelt(), "misspelt")
    assert not info.ok and "register_backbone" in info.errors[0]
    assert "minilm-l6" in [b.name for b in embedkit.list_backbones()]


def test_invalid_backbones_are_rejected_one_by_one():
    class Mixed:
        @embedkit.hookimpl
        def register_backbones(self, register):
            register(_backbone("Bad Name"))
            register("not a backbone")
            register(_backbone("good-one"))

    info = embedkit.register_plugin(Mixed(), "mixed")
    assert info.backbones == ["good-one"]
    assert len(info.errors) == 2 and "[name]" in info.errors[0] and "str" in info.errors[1]


def test_plugin_that_raises_costs_only_itself():
    class Raises:
        @embedkit.hookimpl
        def register_backbones(self, register):
            raise RuntimeError("boom")

    info = embedkit.register_plugin(Raises(), "raises")
    assert "RuntimeError: boom" in info.errors[0]
    assert embedkit.get_backbone("minilm-l6").dim == 384


def test_duplicate_name_is_an_error_naming_both_plugins():
    class Dup:
        @embedkit.hookimpl
        def register_backbones(self, register):
            register(_backbone("minilm-l6", dim=384))

    info = embedkit.register_plugin(Dup(), "dup")
    assert "'text'" in info.errors[0] and "'dup'" in info.errors[0]
    report = {p.name: p for p in embedkit.plugin_report()}
    assert not report["text"].ok
    with pytest.raises(embedkit.DuplicateBackboneError, match="'text' and plugin 'dup'"):
        embedkit.get_backbone("minilm-l6")


@pytest.mark.parametrize("field,value,rule", [
    ("name", "-bad", "name"), ("modality", "audio", "modality"), ("dim", 0, "dim"), ("dim", True, "dim"),
    ("license", "", "license"), ("weights", " ", "weights"),
])
def test_backbone_validation_names_the_rule(field, value, rule):
    import dataclasses

    bad = dataclasses.replace(_backbone("ok"), **{field: value})
    with pytest.raises(embedkit.InvalidBackboneError, match=rf"\[{rule}\]"):
        bad.validate()


def test_preprocess_validation():
    for kwargs, rule in (({"pooling": "median"}, "pooling"), ({"max_length": 1}, "max_length"),
                         ({"normalize": "yes"}, "normalize")):
        pre = embedkit.TextPreprocess(tokenizer="t.json", **kwargs)
        with pytest.raises(embedkit.InvalidBackboneError, match=rule):
            pre.validate()
    pre = embedkit.TextPreprocess(tokenizer="t.json", max_length=64, pooling="cls", normalize=False)
    from embedkit.backbones.backbone import preprocess_from_json

    assert preprocess_from_json(pre.to_json()) == pre


def test_backbone_without_builder_is_invalid():
    import dataclasses

    with pytest.raises(embedkit.InvalidBackboneError, match="build"):
        dataclasses.replace(_backbone("x"), builder=None).validate()
