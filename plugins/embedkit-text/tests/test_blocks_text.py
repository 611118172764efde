"""Blocks of transformers encoders and decoders (inferred): the embeddings, then each layer."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

import embedkit
from embedkit.blocks import blocks_of, infer_blocks, plan_freeze
from embedkit_text import minilm_folder
from embedkit_text.folder import folder_backbone
from embedkit_text.module import PooledEncoder


def batch(texts):
    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    return (torch.tensor([e.ids for e in encoded]), torch.tensor([e.attention_mask for e in encoded]))


def test_minilm_blocks_are_embeddings_then_its_6_layers():
    backbone = embedkit.get_backbone("minilm-l6")
    module = backbone.build()
    assert infer_blocks(module) == ("model.embeddings", "model.encoder.layer.*")
    blocks = blocks_of(backbone, module)
    assert [name for name, _ in blocks] == ["model.embeddings"] + [f"model.encoder.layer.{i}" for i in range(6)]
    assert all(block is module.model.encoder.layer[i] for i, (_, block) in enumerate(blocks[1:]))


def test_minilm_last_2_one_step_changes_only_layers_4_and_5():
    backbone = embedkit.get_backbone("minilm-l6")
    module = backbone.build()
    plan = plan_freeze(backbone, module, "last:2")
    names = [n for n, _ in module.named_parameters()]
    layers = [n for n in names if n.startswith(("model.encoder.layer.4.", "model.encoder.layer.5."))]
    pooler = [n for n in names if n.startswith("model.pooler.")]  # after the last block: depth 0, never used
    assert [n for n, _, _ in plan.trainable] == layers + pooler
    assert {d for n, _, d in plan.trainable if ".layer.4." in n} == {1}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimiser = torch.optim.AdamW([p for _, p, _ in plan.trainable], lr=1e-4)
    plan.train(module)
    dropouts = lambda m: {x.training for x in m.modules() if isinstance(x, torch.nn.Dropout)}
    assert dropouts(module.model.encoder.layer[0]) == {False} and dropouts(module.model.embeddings) == {False}
    assert dropouts(module.model.encoder.layer[5]) == {True}
    torch.manual_seed(0)
    out = module(*batch(["card payment declined", "how do I top up"]))
    assert out.shape == (2, 384)
    (out[0] @ out[1]).backward()
    optimiser.step()
    after = module.state_dict()
    assert sorted(k for k in before if not torch.equal(before[k], after[k])) == sorted(layers)


@pytest.mark.parametrize("family,expected", [
    ("bert", ("model.embeddings", "model.encoder.layer.*")),
    ("roberta", ("model.embeddings", "model.encoder.layer.*")),
    ("t5", ("model.shared+model.encoder.embed_tokens", "model.encoder.block.*")),
    ("gpt2", ("model.wte+model.wpe", "model.h.*")),
])
def test_folder_families(tiny_models, family, expected):
    backbone = folder_backbone(tiny_models[family])
    module = backbone.build()
    assert infer_blocks(module) == expected
    assert len(blocks_of(backbone, module)) == 3  # embeddings + 2 layers
    # T5's encoder embedding is tied to 'shared': one parameter, in one block, trained once.
    assert len(plan_freeze(backbone, module, "all").trainable) == len(list(module.parameters()))


def tiny(family):
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=40)
    if family == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, hidden_dim=32,
                                                      max_position_embeddings=40))
    config = {"mpnet": tf.MPNetConfig, "xlm-roberta": tf.XLMRobertaConfig, "deberta-v2": tf.DebertaV2Config,
              "electra": tf.ElectraConfig}[family](**small)
    return tf.AutoModel.from_config(config)


@pytest.mark.parametrize("family,expected", [
    ("distilbert", ("model.embeddings", "model.transformer.layer.*")),
    ("mpnet", ("model.embeddings", "model.encoder.layer.*")),
    ("xlm-roberta", ("model.embeddings", "model.encoder.layer.*")),
    ("deberta-v2", ("model.embeddings", "model.encoder.layer.*")),
    ("electra", ("model.embeddings", "model.encoder.layer.*")),
])
def test_other_encoder_families(family, expected):
    module = PooledEncoder(tiny(family), "mean", True, False)
    assert infer_blocks(module) == expected
    backbone = embedkit.Backbone(name=family, modality="text", dim=16, weights="random", license="MIT",
                                 preprocess=embedkit.TextPreprocess(tokenizer="t.json"), builder=lambda: module)
    blocks = blocks_of(backbone, module)
    assert len(blocks) == 4
    plan = plan_freeze(backbone, module, "last:1")
    last = {id(p) for p in blocks[-1][1].parameters()}
    # Only the last layer (and what follows it: a pooler, DeBERTa's shared relative embeddings) trains.
    inside = [n for n, p, _ in plan.trainable if id(p) in last]
    assert inside and len(inside) == len(last)
    assert not any(id(p) in {id(q) for _, b in blocks[:-1] for q in b.parameters()} for _, p, _ in plan.trainable)
