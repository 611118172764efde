"""SetFit's contrastive recipe (embedkit.finetuning.contrastive): pair sampling and the cosine-similarity step."""
from collections import Counter

import numpy as np
import pytest
import torch
from tiny import TOKENIZER, Pooled

import embedkit
from embedkit.finetuning.contrastive import encode, finetune_contrastive, sample_pairs, text_tokenizer

LABELS = ["a", "a", "a", "b", "b", "c"]  # 3 + 2 + 1 items


def within(labels):
    """Every unordered pair i <= j of one label (an item with itself included), as SetFit lists them."""
    return {(i, j) for i in range(len(labels)) for j in range(i, len(labels)) if labels[i] == labels[j]}


def across(labels):
    return {(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels)) if labels[i] != labels[j]}


def test_pair_counts_label_balance_and_cycling_for_a_seed():
    pairs = sample_pairs(LABELS, iterations=2, seed=0)
    assert len(pairs) == 2 * 2 * 6 and pairs.positives == 12 and pairs.negatives == 12
    assert pairs.target.tolist() == [1.0, 0.0] * 12  # positive and negative alternate, positive first
    assert (pairs.left <= pairs.right).all()
    pos = list(zip(pairs.left[0::2].tolist(), pairs.right[0::2].tolist()))
    neg = list(zip(pairs.left[1::2].tolist(), pairs.right[1::2].tolist()))
    assert len(within(LABELS)) == 10 and len(across(LABELS)) == 11
    # 12 wanted of 10 positive pairs: one full random order of all 10, then its first 2 again
    assert set(pos[:10]) == within(LABELS) and pos[10:] == pos[:2]
    assert set(neg[:11]) == across(LABELS) and neg[11:] == neg[:1]
    again = sample_pairs(LABELS, iterations=2, seed=0)
    assert np.array_equal(again.left, pairs.left) and np.array_equal(again.right, pairs.right)
    other = sample_pairs(LABELS, iterations=2, seed=1)
    assert not (np.array_equal(other.left, pairs.left) and np.array_equal(other.right, pairs.right))


def test_few_shot_scale_positives_repeat_evenly_negatives_never():
    labels = np.repeat([f"intent-{k}" for k in range(77)], 8)  # Banking77, 8 per class
    pairs = sample_pairs(labels, iterations=20, seed=3)
    assert len(pairs) == 24640 and pairs.positives == pairs.negatives == 12320
    pos = Counter(zip(pairs.left[0::2].tolist(), pairs.right[0::2].tolist()))
    neg = Counter(zip(pairs.left[1::2].tolist(), pairs.right[1::2].tolist()))
    assert len(pos) == 77 * 36  # every within-class pair (8 * 9 / 2 per class), each 4 or 5 times
    assert set(pos.values()) == {4, 5} and sum(v == 5 for v in pos.values()) == 12320 - 4 * 2772
    assert len(neg) == 12320 and all(labels[i] != labels[j] for i, j in neg)  # drawn without replacement
    assert all(labels[i] == labels[j] for i, j in pos)


def test_bad_labels_are_typed_errors():
    with pytest.raises(embedkit.DatasetError, match="same label"):
        sample_pairs(["x"] * 5, 2, 0)
    with pytest.raises(embedkit.DatasetError, match="missing"):
        sample_pairs(["a", None, "b"], 2, 0)
    with pytest.raises(embedkit.DatasetError, match="missing"):
        sample_pairs([1.0, float("nan"), 2.0], 2, 0)
    with pytest.raises(embedkit.DatasetError, match="at least 2"):
        sample_pairs(["a"], 2, 0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(embedkit.UsageError, match="iterations"):
            sample_pairs(LABELS, bad, 0)
    with pytest.raises(embedkit.DatasetError, match="hashable"):
        sample_pairs([["a"], ["b"]], 1, 0)


TEXTS = ["cat kitten", "kitten cat pet", "a small cat", "truck car", "car vehicle road", "a big truck"]
TOY = ["pet"] * 3 + ["car"] * 3


@pytest.fixture()
def tokenize():
    return text_tokenizer(embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=64))


def cosines(module, tokenize):
    v = encode(module, tokenize, TEXTS)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    same = np.equal.outer(np.array(TOY), np.array(TOY))
    off = ~np.eye(len(TEXTS), dtype=bool)
    return sim[same & off].mean(), sim[~same].mean()


def test_contrastive_training_pulls_positives_together_and_pushes_negatives_apart(tokenize):
    module = Pooled(dim=8, seed=0)
    pos_before, neg_before = cosines(module, tokenize)
    steps = []
    history = finetune_contrastive(module, tokenize, TEXTS, TOY, iterations=4, epochs=2, batch_size=8, lr=5e-2,
                                   seed=0, progress=lambda done, total: steps.append((done, total)))
    pos_after, neg_after = cosines(module, tokenize)
    assert pos_after > pos_before + 0.1 and neg_after < neg_before - 0.1
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["pairs"] == 48 and h["positives"] == h["negatives"] == 24 and h["steps"] == 6 for h in history)
    assert history[1]["loss"] < history[0]["loss"]
    assert steps[-1] == (12, 12) and len(steps) == 12
    assert not module.training


def test_seeded_and_frozen_parameters_are_left_alone(tokenize):
    def run(seed):
        module = Pooled(dim=8, seed=0)
        finetune_contrastive(module, tokenize, TEXTS, TOY, iterations=2, lr=1e-2, seed=seed)
        return module.emb.weight.detach().clone()

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))

    class TwoPart(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Pooled(dim=8, seed=0)
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask):
            return self.proj(self.body(input_ids, attention_mask))

    module = TwoPart()
    module.body.emb.weight.requires_grad_(False)
    frozen = module.body.emb.weight.detach().clone()
    trained = module.proj.weight.detach().clone()
    finetune_contrastive(module, tokenize, TEXTS, TOY, iterations=2, lr=1e-2, seed=0)
    assert torch.equal(module.body.emb.weight, frozen)
    assert not torch.equal(module.proj.weight.detach(), trained)


def test_bad_calls_are_refused_before_training(tokenize):
    module = Pooled(dim=8, seed=0)
    before = module.emb.weight.detach().clone()
    with pytest.raises(embedkit.DatasetError, match="5 labels for 6 texts"):
        finetune_contrastive(module, tokenize, TEXTS, TOY[:5])
    with pytest.raises(embedkit.DatasetError, match="same label"):
        finetune_contrastive(module, tokenize, TEXTS, ["x"] * 6)
    for name, value in (("epochs", 0), ("batch_size", -2), ("lr", 0.0), ("lr", float("nan")), ("iterations", 0)):
        with pytest.raises(embedkit.UsageError, match=name):
            finetune_contrastive(module, tokenize, TEXTS, TOY, **{name: value})
    module.emb.weight.requires_grad_(False)
    with pytest.raises(embedkit.UsageError, match="no trainable parameter"):
        finetune_contrastive(module, tokenize, TEXTS, TOY)
    assert torch.equal(module.emb.weight, before)
    with pytest.raises(embedkit.InvalidInputError) as info:
        tokenize(["fine", None])
    assert [(e.index, e.code) for e in info.value.errors] == [(1, "not_text")]


def test_encode_gives_input_order_and_shape(tokenize):
    module = Pooled(dim=8, seed=0)
    together = encode(module, tokenize, TEXTS, batch_size=4)
    assert together.shape == (6, 8) and together.dtype == np.float32
    alone = np.stack([encode(module, tokenize, [t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-6)


# -- loss="in-batch": label-drawn pairs with in-batch negatives ---------------------------------
from embedkit.finetuning.contrastive import sample_anchor_batches  # noqa: E402


def test_anchor_batches_hold_distinct_classes_and_use_every_anchor_each_round():
    labels = np.repeat([f"intent-{k}" for k in range(7)], [8, 8, 8, 8, 8, 3, 1])  # unequal classes
    batches = sample_anchor_batches(labels, iterations=2, batch_size=4, seed=5)
    anchors = Counter(a for b in batches for a in b.anchors.tolist())
    # every item is an anchor twice; once the small classes are used up, the last big class's
    # anchors are batched with items lent by other classes (so at least twice)
    assert all(anchors[i] >= 2 for i in range(len(labels)))
    assert sum(len(b) for b in batches) >= 2 * len(labels)
    for b in batches:
        classes = labels[b.anchors]
        assert len(set(classes)) == len(b) >= 2  # one pair per class: every other positive is a true negative
        assert (labels[b.positives] == classes).all()
        big = [k for k, a in enumerate(b.anchors) if (labels == labels[a]).sum() > 1]
        assert all(b.positives[k] != b.anchors[k] for k in big)  # another item of the class when there is one
        assert len(b) <= 4
    again = sample_anchor_batches(labels, iterations=2, batch_size=4, seed=5)
    assert all(np.array_equal(x.anchors, y.anchors) and np.array_equal(x.positives, y.positives)
               for x, y in zip(batches, again))
    other = sample_anchor_batches(labels, iterations=2, batch_size=4, seed=6)
    assert not all(np.array_equal(x.anchors, y.anchors) for x, y in zip(batches, other))
    # Banking77's few-shot shape: 77 classes of 8 in batches of all 77 -> 8 batches a round
    few = sample_anchor_batches(np.repeat(np.arange(77), 8), iterations=1, batch_size=77, seed=0)
    assert [len(b) for b in few] == [77] * 8


def test_anchor_batches_refuse_what_gives_no_negative():
    with pytest.raises(embedkit.DatasetError, match="same label"):
        sample_anchor_batches(["x"] * 4, 1, 4, 0)
    with pytest.raises(embedkit.DatasetError, match="missing"):
        sample_anchor_batches(["a", None, "b"], 1, 4, 0)
    for name, kwargs in (("batch_size", {"batch_size": 1}), ("iterations", {"iterations": 0}),
                         ("batch_size", {"batch_size": 2.5})):
        with pytest.raises(embedkit.UsageError, match=name):
            sample_anchor_batches(LABELS, **{"iterations": 1, "batch_size": 4, **kwargs})


def test_in_batch_loss_pulls_positives_together_and_pushes_negatives_apart(tokenize):
    module = Pooled(dim=8, seed=0)
    pos_before, neg_before = cosines(module, tokenize)
    history = finetune_contrastive(module, tokenize, TEXTS, TOY, loss="in-batch", iterations=8, epochs=2,
                                   batch_size=2, lr=5e-2, seed=0)
    pos_after, neg_after = cosines(module, tokenize)
    assert pos_after > pos_before + 0.1 and neg_after < neg_before - 0.1
    # 2 classes of 3, batch of 2 classes: 3 batches a round, 8 rounds; each pair meets 1 negative
    assert all(h["steps"] == 24 and h["pairs"] == 48 and h["positives"] == 48 and h["negatives"] == 48
               for h in history)
    assert history[1]["loss"] < history[0]["loss"]

    def run(seed):
        m = Pooled(dim=8, seed=0)
        finetune_contrastive(m, tokenize, TEXTS, TOY, loss="in-batch", iterations=2, batch_size=2, lr=1e-2, seed=seed)
        return m.emb.weight.detach().clone()

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_in_batch_options_are_refused_before_training(tokenize):
    module = Pooled(dim=8, seed=0)
    before = module.emb.weight.detach().clone()
    for kwargs, match in (({"loss": "triplet"}, "loss must be one of cosine, in-batch"),
                          ({"loss": "in-batch", "batch_size": 1}, "batch_size"),
                          ({"loss": "in-batch", "scale": 0.0}, "scale"),
                          ({"loss": "in-batch", "scale": float("inf")}, "scale")):
        with pytest.raises(embedkit.UsageError, match=match):
            finetune_contrastive(module, tokenize, TEXTS, TOY, **kwargs)
    assert torch.equal(module.emb.weight, before)
