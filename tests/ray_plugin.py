"""A test-only embedkit plugin for the Ray engine's tests: a tiny text backbone, and a poison one.

Registered through embedkit's plugin API (``embedkit.register_plugin(module, name)``); the Ray
engine registers the driver's in-process plugin modules in every actor too. ``tiny-ray-poison``
runs under the torch runtime (its own module at encode time): a batch holding the token of the
marker word ``zeppelin`` kills its process with ``os._exit`` (as a native crash would).
"""
from __future__ import annotations

import os

from tiny import Pooled, text_backbone

import embedkit

MARKER = "zeppelin"
MARKER_TOKEN = 22116  # "zeppelin" in the MiniLM (BERT uncased) vocabulary


class Poisoned(Pooled):
    def forward(self, input_ids, attention_mask):
        import torch

        if not torch.onnx.is_in_onnx_export() and bool((input_ids == MARKER_TOKEN).any()):
            log = os.environ.get("EMBEDKIT_TEST_POISON_LOG")
            if log:  # the test counts the attempts
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\n")
            os._exit(17)  # the whole worker process dies, like a segfault in native code
        return super().forward(input_ids, attention_mask)


def _tiny():
    return Pooled(dim=8, seed=3)


def _poisoned():
    module = Poisoned(dim=8, seed=4)
    return module


@embedkit.hookimpl
def register_backbones(register):
    register(text_backbone("tiny-ray", _tiny))
    register(text_backbone("tiny-ray-poison", _poisoned))
