"""A test-only embedkit plugin for the Ray engine's tests: a tiny text backbone, and a poison one.

Registered through embedkit's plugin API (``embedkit.register_plugin(module, name)``); the Ray
engine registers the driver's in-process plugin modules in every actor too. ``tiny-ray-poison``
runs under the torch runtime (its own module at encode time): a batch holding the token of the
marker word ``zeppelin`` kills its process with ``os._exit`` (as a native crash would).
``tiny-ray-dies-loading`` kills every Ray actor that builds it (a native crash or out of memory
while a model loads): exported in the driver, it never runs in an actor.
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


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, or not a worker
        return False


def _dies_loading():
    if _in_ray_actor():
        os._exit(19)
    return Pooled(dim=8, seed=5)


def _tiny():
    return Pooled(dim=8, seed=3)


def _poisoned():
    module = Poisoned(dim=8, seed=4)
    return module


@embedkit.hookimpl
def register_backbones(register):
    register(text_backbone("tiny-ray", _tiny))
    register(text_backbone("tiny-ray-poison", _poisoned))
    register(text_backbone("tiny-ray-dies-loading", _dies_loading))
