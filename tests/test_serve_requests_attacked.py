"""What a fresh attack on ``embedkit serve``'s requests found, each through a real subprocess on
127.0.0.1: ``Retry-After`` that was 1 whatever the wait (body and image budgets), vectors of texts
batched with others (equal within float32 rounding, not bit for bit), the 422 ``invalid_request``
and its wording, base64 images with line breaks or a ``DATA:`` scheme, ``dimensions`` on
``/predict``, and a multipart body without its closing boundary.

Every server is stopped at the end; every wait is bounded. Retry-After is asserted against what the
test then measures (the holding request's actual remaining time), with a factor-2 margin.
"""
from __future__ import annotations

import asyncio
import base64
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from serving import ROOT, Server  # noqa: E402
from tiny import Pooled, TinyConv, png, text_backbone  # noqa: E402

import embedkit  # noqa: E402

WAIT_MS = 4000  # a lone request waits this long for its batch to fill: a request of known duration


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    text = embedkit.export(text_backbone("tiny-serve-text", lambda: Pooled(dim=8)))
    image = embedkit.export(embedkit.Backbone(
        name="tiny-serve-image", modality="image", dim=8, weights="random", license="MIT",
        preprocess=embedkit.ImagePreprocess(crop=(32, 32), resize=32), builder=TinyConv,
    ))
    embedder = embedkit.Embedder(str(text.path)).fit()
    texts = ["the card was declined", "how do I top up?", "a", "where is my refund"]
    folder = tmp_path_factory.mktemp("saved") / "intent"
    embedkit.save(Pipeline([("embed", embedder), ("head", LogisticRegression().fit(
        embedder.transform(texts * 2), ["card", "topup", "card", "refund"] * 2))]), folder)
    return {"text": text, "image": image, "saved": folder}


@pytest.fixture(scope="module")
def server(models):
    with Server("--backbone", f"tiny-text={models['text'].path}", "--backbone", f"tiny-image={models['image'].path}",
                "--model", f"intent={models['saved']}", "--max-wait-ms", "20") as s:
        yield s
    assert "Traceback" not in s.stderr, s.stderr[-3000:]


def held_then_refused(url: str, first: dict, second: dict, settle: float = 0.5) -> tuple:
    """Send ``first`` (it holds the budget for about WAIT_MS), then ``second`` ``settle`` s later;
    (first's response, second's response, seconds from second's answer to first's answer)."""
    async def run() -> tuple:
        async with httpx.AsyncClient(timeout=120) as http:
            holder = asyncio.ensure_future(http.post(url + "/embed", **first))
            await asyncio.sleep(settle)
            refused = await http.post(url + "/embed", **second)
            refused_at = time.monotonic()
            answered = await asyncio.wait_for(holder, 60)
            return answered, refused, time.monotonic() - refused_at

    return asyncio.run(run())


# -- (1) Retry-After from measured durations of whole requests -------------------------------------
def test_server_busy_retry_after_is_when_the_holder_will_finish(models):
    """The body budget (3,000 bytes) holds one request of ~2,000 bytes: a second gets 429 ``server_busy``
    whose Retry-After is at least half the time the holder then takes (~3.5 s), not 1. Before, with no
    request answered in the last 30 s, it was 1 whatever the wait."""
    body = {"json": {"model": "tiny-text", "texts": ["card " * 380]}}
    with Server("--backbone", f"tiny-text={models['text'].path}", "--max-body-bytes", "3000",
                "--max-inflight-bytes", "3000", "--max-wait-ms", str(WAIT_MS)) as srv:
        start = time.monotonic()
        warm = httpx.post(srv.url + "/embed", timeout=60, **body)  # measured: one request of this size
        assert warm.status_code == 200 and time.monotonic() - start >= WAIT_MS / 1000 * 0.9
        held, refused, remaining = held_then_refused(srv.url, body, body)
        assert held.status_code == 200, held.text
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "server_busy", refused.text
        retry = int(refused.headers["retry-after"])
        print(f"server_busy Retry-After {retry} s; the holder finished {remaining:.1f} s later", file=sys.stderr)
        assert remaining >= 2.0  # the scenario: nothing could free within 1 s
        assert remaining / 2 <= retry <= 4 * remaining + 2, (retry, remaining)
        assert f"retry after {retry} s" in refused.json()["error"]["message"]


def test_image_budget_retry_after_is_when_whole_requests_will_finish(models):
    """The image budget holds 5 decoded 32 x 32 inputs; a request of 4 holds it for ~4 s (its batch
    waits to fill); one of 2 gets 429 ``image_budget_full`` with a Retry-After of at least half the
    time the holder then takes: its bytes free all at once when it is answered, not continuously."""
    each = 3 * 32 * 32 * 4
    files = {"files": [("images", (f"{k}.png", png(k), "image/png")) for k in range(4)], "data": {"model": "img"}}
    two = {"files": [("images", (f"{k}.png", png(k), "image/png")) for k in range(2)], "data": {"model": "img"}}
    with Server("--backbone", f"img={models['image'].path}", "--max-inflight-image-bytes", str(5 * each),
                "--max-wait-ms", str(WAIT_MS)) as srv:
        warm = httpx.post(srv.url + "/embed", timeout=60, **files)
        assert warm.status_code == 200 and all(warm.json()["ok"])
        held, refused, remaining = held_then_refused(srv.url, files, two)
        assert held.status_code == 200, held.text
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "image_budget_full", refused.text
        retry = int(refused.headers["retry-after"])
        print(f"image_budget_full Retry-After {retry} s; the holder finished {remaining:.1f} s later", file=sys.stderr)
        assert remaining >= 2.0
        assert remaining / 2 <= retry <= 4 * remaining + 2, (retry, remaining)


def test_retry_after_outlives_a_window_and_counts_overdue_holders(monkeypatch):
    """The rule on a clock (embedkit.serve.retry): four 16 MB requests in flight for 40 s, one such
    request measured at 57 s an hour ago: a fifth waits ~17 s (not 1: nothing finished in the last
    30 s). Unmeasured, or overdue, a holder is expected to need as long again as it has run."""
    from embedkit.serve import app, retry

    now = [1000.0]
    monkeypatch.setattr(retry.time, "monotonic", lambda: now[0])
    size = 16 * 2**20
    budget = app.Budget(64 * 2**20)
    assert budget.take(size)
    now[0] += 57
    budget.give(size)  # measured: 57 s for 16 MB
    now[0] += 3600
    for _ in range(4):
        assert budget.take(size)
    now[0] += 40
    assert not budget.take(size)  # 429 server_busy
    assert budget.retry_after(size) == 17
    now[0] += 30  # 70 s: overdue by 13 s: as long again as they have run
    assert budget.retry_after(size) == 70
    fresh = app.Budget(64 * 2**20)
    for _ in range(4):
        assert fresh.take(size)
    now[0] += 25
    assert fresh.retry_after(size) == 25  # nothing measured: the holders' age


# -- (2) vectors of texts batched with others: equal within float32 rounding -----------------------
def test_concurrent_texts_of_different_lengths_equal_the_library_within_the_stated_bound(server, models):
    """48 concurrent requests of texts of 1 to ~60 tokens (batched together, padded to each other's
    lengths): every row within 1e-6 of ``embedkit.embed([text])`` (docs/serve.md states the bound)."""
    words = "card declined refund top up transfer pending exchange rate fee verify identity".split()
    texts = [" ".join(words[(k + j) % len(words)] for j in range(1 + (k * 7) % 60)) for k in range(48)]

    async def burst() -> list:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.wait_for(asyncio.gather(*(
                http.post(server.url + "/embed", json={"model": "tiny-text", "texts": [t]}) for t in texts)), 120)

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * len(texts)
    got = np.array([r.json()["data"][0] for r in answers], dtype=np.float32)
    alone = np.array([embedkit.embed([t], backbone=str(models["text"].path)).vectors[0] for t in texts])
    diff = np.abs(got - alone).max()
    print(f"max |served - embed([text])| = {diff:.2e}; rows not bit-identical: "
          f"{int((got != alone).any(axis=1).sum())} of {len(texts)}", file=sys.stderr)
    assert diff <= 1e-6
    for t, row in zip(texts[:6], alone):  # one at a time, each batched alone: bit for bit
        r = httpx.post(server.url + "/embed", json={"model": "tiny-text", "texts": [t]}, timeout=30)
        np.testing.assert_array_equal(np.array(r.json()["data"][0], dtype=np.float32), row)
    docs = (ROOT / "docs" / "serve.md").read_text()
    assert "1e-6" in docs and "padded" in docs


# -- (3) invalid_request: documented, worded ------------------------------------------------------
def test_invalid_request_is_documented_and_worded(server):
    for path, body, key in (("/embed", {"model": "tiny-text", "texts": ["a"], "images": ["a"]}, "texts"),
                            ("/embed", {"model": "tiny-text"}, "texts"), ("/predict", {"model": "intent"}, "inputs")):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
        assert r.json()["error"]["message"] == f"send exactly one of '{key}' or 'images'"
    r = httpx.post(server.url + "/embed", json={"model": "tiny-image", "texts": ["a"]}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_modality"
    assert "tiny-image is an image model" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/embed", json={"model": "tiny-text", "images": ["aGk="]}, timeout=30)
    assert "tiny-text is a text model" in r.json()["error"]["message"]
    table = (ROOT / "docs" / "serve.md").read_text().split("| status | when |", 1)[1].split("\n- ", 1)[0]
    row = next(line for line in table.splitlines() if line.startswith("  | 422"))
    assert "invalid_request" in row and "exactly one of" in row


# -- (4) base64 as the base64 command prints it, data: in any case --------------------------------
def test_base64_with_line_breaks_and_a_capital_data_scheme_is_accepted(server, models):
    image = png(3)
    plain = base64.b64encode(image).decode()
    accepted = [plain, base64.encodebytes(image).decode(), plain + "\n", "  " + plain + "\r\n",
                "DATA:IMAGE/PNG;BASE64," + base64.encodebytes(image).decode(), "data:image/png;Base64," + plain,
                "Data:;base64," + plain]
    assert "\n" in accepted[1][:80] and len(accepted[1].splitlines()[0]) == 76
    refused = ["not base64!!", plain[:-2] + "*=", "data:image/png," + plain, plain[:-1], "DATA:image/png;base32," + plain,
               plain[:10] + "é" + plain[10:]]
    r = httpx.post(server.url + "/embed", json={"model": "tiny-image", "images": accepted + refused}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] == [True] * len(accepted) + [False] * len(refused), body["errors"]
    assert {e["code"] for e in body["errors"]} == {"invalid_base64"}
    expected = embedkit.embed([image], backbone=str(models["image"].path)).vectors[0]
    for row in body["data"][: len(accepted)]:
        np.testing.assert_allclose(np.array(row, dtype=np.float32), expected, atol=1e-6)


# -- (5) dimensions on /predict ---------------------------------------------------------------------
def test_predict_refuses_dimensions_as_embed_does(server):
    for path, body in (("/predict", {"model": "intent", "inputs": ["card declined"], "dimensions": 4}),
                       ("/embed", {"model": "tiny-text", "texts": ["card declined"], "dimensions": 4})):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_dimensions", (path, r.text)
    ok = httpx.post(server.url + "/predict", json={"model": "intent", "inputs": ["card declined"]}, timeout=30)
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"]


# -- (6) a multipart body cut short -----------------------------------------------------------------
def test_unfinished_multipart_body_is_400_invalid_form(server):
    image = png(5)
    part = (b"--XyZ\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n")
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    for body in (part, part[:-40], b"--XyZ\r\n", part + b"--XyZ\r\n"):
        r = httpx.post(server.url + "/embed", content=body, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_form", r.text
    for body in (part + b"--XyZ--\r\n", part + b"--XyZ--", part + b"--XyZ--\r\nan epilogue\r\n"):
        r = httpx.post(server.url + "/embed", content=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["ok"] == [True], r.text
    r = httpx.post(server.url + "/embed", content=part + b"--XyZ--\r\n", timeout=30,
                   headers={"Content-Type": 'multipart/form-data; boundary="XyZ"'})
    assert r.status_code == 200, r.text
