"""Tiny random-weight backbones with blocks, for the fine-tuning tests (registered in-process)."""
from __future__ import annotations

import torch

import embedkit
from embedkit_text import minilm_folder

TOKENIZER = str(minilm_folder() / "tokenizer.json")


class TinyText(torch.nn.Module):
    """Embedding, two residual layers with dropout, masked mean: 3 blocks."""

    def __init__(self, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30522, dim)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Tanh(),
                                                              torch.nn.Dropout(0.1)) for _ in range(2))

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        m = attention_mask.unsqueeze(-1).float()
        return (x * m).sum(1) / m.sum(1)


class TinyImage(torch.nn.Module):
    """Two conv + BatchNorm stages and a global average pool: 2 blocks."""

    def __init__(self, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU()),
            torch.nn.Sequential(torch.nn.Conv2d(4, dim, 3, stride=2), torch.nn.BatchNorm2d(dim), torch.nn.ReLU()),
        )

    def forward(self, pixel_values):
        return self.features(pixel_values).mean((2, 3))


class TinyRelu(torch.nn.Module):
    """Embedding, two ReLU layers, masked mean, a linear output: at an absurd learning rate its
    ReLUs die and every text embeds to the output's bias (a collapsed backbone, finite)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30522, dim)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU())
                                          for _ in range(2))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = layer(x)
        m = attention_mask.unsqueeze(-1).float()
        return self.out((x * m).sum(1) / m.sum(1))


TEXT = embedkit.Backbone(name="ft-tiny-text", modality="text", dim=8, weights="random", license="MIT",
                         preprocess=embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=32, normalize=False),
                         builder=TinyText, blocks=("emb", "layers.*"))
NOBLOCKS = embedkit.Backbone(name="ft-tiny-noblocks", modality="text", dim=8, weights="random", license="MIT",
                             preprocess=embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=32, normalize=False),
                             builder=TinyText)
IMAGE = embedkit.Backbone(name="ft-tiny-image", modality="image", dim=8, weights="random", license="MIT",
                          preprocess=embedkit.ImagePreprocess(crop=(32, 32), resize=36), builder=TinyImage,
                          blocks=("features.*",))

RELU = embedkit.Backbone(name="ft-tiny-relu", modality="text", dim=8, weights="random", license="MIT",
                         preprocess=embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=32, normalize=False),
                         builder=TinyRelu, blocks=("emb", "layers.*", "out"))


class Plugin:
    @embedkit.hookimpl
    def register_backbones(self, register):
        for b in (TEXT, NOBLOCKS, IMAGE, RELU):
            register(b)


def register() -> None:
    """Register the tiny backbones once per process (as an installed plugin would be)."""
    from embedkit.backbones.registry import registry

    if "ft-tiny-text" not in registry().backbones:
        embedkit.register_plugin(Plugin(), "finetune-tiny")


POS = ["good movie", "great film", "lovely story", "wonderful acting", "superb plot", "nice ending",
       "excellent cast", "brilliant work"]
NEG = ["bad movie", "awful film", "boring story", "terrible acting", "weak plot", "poor ending",
       "dull cast", "horrible work"]
TEXTS = POS + NEG
LABELS = ["pos"] * len(POS) + ["neg"] * len(NEG)


if __name__ == "__main__":  # the embedkit command with the tiny backbones installed, for subprocess tests
    import sys

    from embedkit.cli import main

    register()
    sys.exit(main(sys.argv[1:]))


def table(path, texts, labels):
    """A CSV ``text,label`` of ``texts`` and ``labels`` at ``path`` (returned): the CLI tests' input."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return path


def errors(stderr: str) -> list[str]:
    """The ``error: `` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]
