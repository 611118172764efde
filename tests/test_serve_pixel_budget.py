"""The decoded images of all requests in flight, bounded (issue 22, item 2), through a real
``embedkit serve`` subprocess on 127.0.0.1.

A 224 x 224 PNG of a few colours is ~600 bytes; decoded, it is a 3 x 224 x 224 float32 model input
of 602,112 bytes. Before the budget, a queue of 4096 items could hold 2.4 GB of them from 2.4 MB of
bodies. Every server is stopped at the end; every loop is bounded in count and time; the assertions
are properties (typed status, a bound), never the outcome of a race.
"""
from __future__ import annotations

import asyncio
import io
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from serving import ROOT, Server, metric  # noqa: E402
from tiny import TinyConv  # noqa: E402

import embedkit  # noqa: E402

EACH = 3 * 224 * 224 * 4  # decoded bytes of one image of the 224 x 224 model
DEFAULT = 512 * 2**20  # the service's default budget


@pytest.fixture(scope="module")
def model():
    return embedkit.export(embedkit.Backbone(
        name="tiny-budget-image", modality="image", dim=8, weights="random", license="MIT",
        preprocess=embedkit.ImagePreprocess(crop=(224, 224), resize=224), builder=TinyConv,
    ))


def tiny(k: int) -> bytes:
    """A 224 x 224 PNG of ~600 bytes (two gradients: not blank), different for each ``k`` < 256."""
    from PIL import Image

    g = Image.linear_gradient("L").resize((224, 224))
    image = Image.merge("RGB", (g, g.transpose(Image.Transpose.ROTATE_90), Image.new("L", (224, 224), k % 256)))
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def form(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{k}.png", p, "image/png")) for k, p in enumerate(images)]


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS since the process started) of ``pid`` in MiB, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def test_help_and_docs_give_the_image_budget_default():
    from support import run_cli

    flat = " ".join(run_cli("serve", "--help").stdout.split())
    part = flat.split("--max-inflight-image-bytes ", 2)[-1][:500]
    assert f"default {DEFAULT}" in part and "429 image_budget_full" in part and "413" in part, part
    docs = (ROOT / "docs" / "serve.md").read_text()
    for word in ("--max-inflight-image-bytes", "image_budget_full", "too_many_image_bytes", str(DEFAULT)):
        assert word in docs, word
    readme = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    assert "--max-inflight-image-bytes" in readme and "512 MiB" in readme


def test_over_the_budget_429_then_retries_succeed_and_never_fitting_is_413(model):
    """A budget of 32 MiB (55 images): a request of 56 can never fit (413, JSON and multipart); one of
    40 is held in the queue (``--max-wait-ms`` 3000, a batch of up to 64), and 5 more of 40 sent then
    each get 429 ``image_budget_full`` with a Retry-After of at least 1 s, before decoding anything.
    Clients that honour Retry-After are all answered, with the library's vectors."""
    import base64

    requests = [[tiny(40 * r + k) for k in range(40)] for r in range(6)]
    expected = embedkit.embed([p for images in requests for p in images], backbone=str(model.path))
    assert expected.ok.all()
    with Server("--backbone", f"img={model.path}", "--max-inflight-image-bytes", str(32 * 2**20),
                "--max-wait-ms", "3000", "--max-batch-images", "64") as srv:
        never = [tiny(k) for k in range(56)]
        for r in (httpx.post(srv.url + "/embed", files=form(never), data={"model": "img"}, timeout=60),
                  httpx.post(srv.url + "/embed", timeout=60, json={
                      "model": "img", "images": [base64.b64encode(p).decode() for p in never]})):
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_image_bytes", r.text
            assert "at most 55 images" in r.json()["error"]["message"]

        async def held_then_more() -> tuple:
            # A fresh connection per request: a pooled one idle for the server's keep-alive (5 s) while
            # a client sleeps Retry-After could be closed just as it is reused (a client-side race).
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as http:
                first = asyncio.ensure_future(http.post(srv.url + "/embed", files=form(requests[0]),
                                                        data={"model": "img"}))
                held = 0.0
                for _ in range(400):  # until the first request holds its 40 images (bounded: ~20 s)
                    held = metric((await http.get(srv.url + "/metrics")).text, "embedkit_inflight_image_bytes")
                    if held or first.done():
                        break
                    await asyncio.sleep(0.05)
                assert held == 40 * EACH, held
                refused = await asyncio.gather(*(http.post(srv.url + "/embed", files=form(images),
                                                           data={"model": "img"}) for images in requests[1:]))
                retries: list[list[int]] = []
                start = time.monotonic()

                async def until_served(images: list[bytes], answer: httpx.Response) -> httpx.Response:
                    waits = []
                    for _ in range(30):  # clients that honour Retry-After (bounded in count and time)
                        if answer.status_code != 429:
                            break
                        assert answer.json()["error"]["code"] == "image_budget_full", answer.text
                        waits.append(int(answer.headers["retry-after"]))
                        await asyncio.sleep(waits[-1])
                        answer = await http.post(srv.url + "/embed", files=form(images), data={"model": "img"})
                    retries.append(waits)
                    return answer

                served = await asyncio.wait_for(asyncio.gather(*(
                    until_served(images, r) for images, r in zip(requests[1:], refused))), 240)
                return await first, refused, retries, served, time.monotonic() - start

        first, refused, retries, served, seconds = asyncio.run(held_then_more())
        assert [r.status_code for r in refused] == [429] * 5, [r.text for r in refused]
        for r in refused:
            assert r.json()["error"]["code"] == "image_budget_full" and r.json()["error"]["type"] == "rate_limit_error"
            assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers["retry-after"]
            assert "--max-inflight-image-bytes" in r.json()["error"]["message"]
        answers = [first, *served]
        assert [r.status_code for r in answers] == [200] * 6, [r.text[:200] for r in answers]
        got = np.array([row for r in answers for row in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, expected.vectors, atol=1e-5)
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "embedkit_inflight_image_bytes") == 0  # every hold was given back
        assert metric(text, "embedkit_requests_total", route="/embed", status="413") == 2
        print(f"Retry-After waits per refused client {retries}; all served in {seconds:.1f} s", file=sys.stderr)


def test_many_tiny_images_stay_within_a_memory_bound(model):
    """8 concurrent requests of 512 tiny PNGs (256 KB of body each) under the default budget (512 MiB):
    decoded, they are 8 x 308 MB = 2.4 GB, all of which fitted the queue of 4096 items before (and
    all were decoded before the queue was even asked). Now at most one is admitted beside another's
    ~308 MB; the others get 429 ``image_budget_full`` before decoding. A request of 892 (one image
    over the budget) gets 413. Bound on the server's peak RSS over its idle RSS: the budget + 192 MiB
    (bodies, batches, allocator slack). Measured here (2 cores, loaded): +305 to +442 MiB, one request
    answered and 7 refused; with the budget lifted (1 TiB, as before it existed) the same load
    grew it by +1234 MiB (all 8 admitted; more with a model slower than its decoding)."""
    images = [tiny(k) for k in range(512)]
    with Server("--backbone", f"img={model.path}") as srv:
        warm = httpx.post(srv.url + "/embed", files=form(images[:32]), data={"model": "img"}, timeout=120)
        assert warm.status_code == 200 and all(warm.json()["ok"])
        idle = status(srv.proc.pid)["VmRSS"]
        never = httpx.post(srv.url + "/embed", files=form([tiny(k) for k in range(892)]), data={"model": "img"},
                           timeout=120)
        assert never.status_code == 413 and never.json()["error"]["code"] == "too_many_image_bytes"
        assert "at most 891 images" in never.json()["error"]["message"]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=240) as http:
                return await asyncio.wait_for(asyncio.gather(*(
                    http.post(srv.url + "/embed", files=form(images), data={"model": "img"}) for _ in range(8))), 300)

        responses = asyncio.run(burst())
        peak = status(srv.proc.pid)["VmHWM"]
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 200 in codes, [r.text[:200] for r in responses]
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "image_budget_full" and int(r.headers["retry-after"]) >= 1
        expected = embedkit.embed(images, backbone=str(model.path)).vectors
        for r in responses:
            if r.status_code == 200:
                np.testing.assert_allclose(np.array(r.json()["data"], dtype=np.float32), expected, atol=1e-5)
        grown = peak - idle
        print(f"idle RSS {idle:.0f} MiB, peak (VmHWM) {peak:.0f} MiB: +{grown:.0f} MiB; statuses {codes}; "
              f"Retry-After {[r.headers.get('retry-after') for r in responses if r.status_code == 429]}",
              file=sys.stderr)
        assert grown < DEFAULT / 2**20 + 192, f"peak RSS {peak:.0f} MiB is {grown:.0f} MiB over idle"
        assert metric(httpx.get(srv.url + "/metrics").text, "embedkit_inflight_image_bytes") == 0
