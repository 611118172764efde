"""The dynamic batcher in process, on a real ONNX Runtime session of a tiny text artifact."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import embedkit
from embedkit.inputs.text import pad
from embedkit.runtimes.onnx_runtime import Runtime
from embedkit.serve.batching import Batcher, Job, QueueFullError


@pytest.fixture(scope="module")
def artifact():
    from tiny import Pooled, text_backbone

    return embedkit.export(text_backbone("tiny-batching", lambda: Pooled(dim=8)))


class Recording:
    """A real runtime that also records the token lengths of every batch it runs."""

    def __init__(self, runtime: Runtime):
        self.runtime, self.sessions, self.batches = runtime, runtime.sessions, []

    def run(self, feeds, stream=0):
        self.batches.append(sorted(int(n) for n in feeds["attention_mask"].sum(1)))
        return self.runtime.run(feeds, stream)


def ids(n: int) -> list[int]:
    return [101] + [2000 + k for k in range(n - 2)] + [102]


def test_batches_group_similar_lengths_within_the_padded_budget_and_equal_unbatched_runs(artifact):
    runtime = Recording(Runtime(artifact.onnx_path, threads=1, streams=1))
    lengths = [2, 30, 3, 31, 2, 29]
    batcher = Batcher(runtime, artifact.dim, "text", max_tokens=64, max_wait=0.2)

    async def run():
        loop = asyncio.get_running_loop()
        job = Job(len(lengths), artifact.dim, loop, loop.create_future())
        batcher.submit(job, list(range(len(lengths))), [ids(n) for n in lengths])
        return await asyncio.wait_for(job.future, 10)

    vectors, errors = asyncio.run(run())
    batcher.close()
    assert errors == []
    # the oldest first, then the closest lengths, never over 64 padded tokens
    assert runtime.batches == [[2, 2, 3], [30, 31], [29]]
    assert all(max(b) * len(b) <= 64 for b in runtime.batches)
    single = np.concatenate([runtime.runtime.run(pad([ids(n)])) for n in lengths])
    np.testing.assert_allclose(vectors, single, atol=1e-6)


def test_full_queue_refuses_and_a_cancelled_job_is_dropped(artifact):
    runtime = Recording(Runtime(artifact.onnx_path, threads=1, streams=1))
    batcher = Batcher(runtime, artifact.dim, "text", max_tokens=10_000, max_wait=0.5, max_queue=4)

    async def run():
        loop = asyncio.get_running_loop()
        first = Job(3, artifact.dim, loop, loop.create_future())
        batcher.submit(first, [0, 1, 2], [ids(4)] * 3)
        with pytest.raises(QueueFullError) as refused:
            batcher.submit(Job(2, artifact.dim, loop, loop.create_future()), [0, 1], [ids(4)] * 2)
        assert refused.value.retry_after >= 1 and batcher.depth == 3
        assert batcher.cancel(first) == 3 and batcher.depth == 0
        second = Job(2, artifact.dim, loop, loop.create_future())
        batcher.submit(second, [0, 1], [ids(5)] * 2)
        return await asyncio.wait_for(second.future, 10)

    vectors, _ = asyncio.run(run())
    batcher.close()
    assert runtime.batches == [[5, 5]]  # the cancelled job's items never ran
    assert batcher.dropped == 3 and np.isfinite(vectors).all()
