"""Tiny random-weight models of each family, built from configs (no hub), with a real tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def text_store() -> Path:
    """The test run's model store (the checkout's ignored models/.test-cache), never the user's cache."""
    root = Path(__file__).resolve().parents[3] / "models" / ".test-cache" / "embedkit"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["EMBEDKIT_HOME"] = str(root)  # even when the user has set one: tests never write there
    return Path(os.environ["EMBEDKIT_HOME"])

WORDS = (
    "the a an of to and in is it that for on with as was at by be this from or have not are but "
    "quick brown fox jumps over lazy dog while careful reader checks every number twice before "
    "trusting transfer learning reuses frozen features pretrained network train small head few "
    "labels little compute card bank money account transfer payment"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 128


def make_tokenizer(path: Path, decoder: bool = False) -> None:
    """A WordPiece tokenizer: [CLS] x [SEP] for encoders, plain ids (+[SEP] as EOS) for decoders."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if decoder:
        tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", 3)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    tok.save(str(path / "tokenizer.json"))


def make_model(root: Path, family: str) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    folder = root / family
    folder.mkdir()
    small = dict(vocab_size=VOCAB, pad_token_id=0)
    if family == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=64, **small))
    elif family == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=66, **small))
    elif family == "t5":
        model = tf.T5EncoderModel(tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                              decoder_start_token_id=0, **small))
    elif family == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **small))
    else:
        raise ValueError(family)
    model.eval().save_pretrained(folder)
    make_tokenizer(folder, decoder=family == "gpt2")
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_model(root, family) for family in ("bert", "roberta", "t5", "gpt2")}
