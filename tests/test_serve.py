"""``embedkit serve`` as a real subprocess on 127.0.0.1: OpenAI compatibility, /embed, /predict,
limits, auth, typed errors, batching, 429, disconnects, metrics and SIGTERM draining.

Tiny random-weight backbones (tests/tiny.py) keep it fast; every load loop is bounded in count
and time, and every server is stopped at the end.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from serving import ROOT, Server, metric  # noqa: E402
from tiny import Pooled, TinyConv, png, text_backbone  # noqa: E402

import embedkit  # noqa: E402

KEY = "s3cret-key-for-tests"
SECRET = "PRIVATE-CONTENT-7f3a"  # sent inside bad requests; must never come back in an error body
TEXTS = ["the card was declined", "how do I top up?", "a", "where is my refund for the order I placed last week"]



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
    labels = ["card", "topup", "card", "refund"] * 2
    X = embedder.transform(TEXTS * 2)
    folder = tmp_path_factory.mktemp("saved") / "intent"
    embedkit.save(Pipeline([("embed", embedder), ("head", LogisticRegression().fit(X, labels))]), folder)
    return {"text": text, "image": image, "saved": folder}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("key") / "key"
    keyfile.write_text(KEY + "\n")
    with Server("--backbone", f"tiny-text={models['text'].path}", "--backbone", f"tiny-image={models['image'].path}",
                "--model", f"intent={models['saved']}", "--api-key-file", str(keyfile), "--max-items", "32",
                "--max-chars", "500", "--max-body-bytes", "200000", "--max-pixels", "1000000",
                "--max-batch-tokens", "512", "--max-wait-ms", "5", key=KEY) as s:
        yield s


def post(server, path, **kw):
    if callable(kw.get("content")):  # a fresh generator each time: a chunked body, no Content-Length
        kw["content"] = kw["content"]()
    return httpx.post(server.url + path, headers={**server.headers, **kw.pop("headers", {})}, timeout=30, **kw)


def library(models, key, items):
    return embedkit.embed(items, backbone=str(models[key].path))


# -- OpenAI compatibility -------------------------------------------------------------------
def test_openai_client_equals_library_float_and_base64(server, models):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    expected = library(models, "text", TEXTS)
    floats = client.embeddings.create(model="tiny-text", input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), expected.vectors, atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == expected.stats.tokens
    # The client asks for base64 when no format is given and decodes it itself.
    implicit = client.embeddings.create(model="tiny-text", input=TEXTS)
    np.testing.assert_allclose(np.array([d.embedding for d in implicit.data]), expected.vectors, atol=1e-5)
    raw = post(server, "/v1/embeddings", json={"model": "tiny-text", "input": TEXTS[0], "encoding_format": "base64"})
    assert raw.status_code == 200
    row = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(row, expected.vectors[0], atol=1e-5)
    same = post(server, "/v1/embeddings", json={"model": "tiny-text", "input": TEXTS[:1], "dimensions": 8})
    assert same.status_code == 200 and len(same.json()["data"][0]["embedding"]) == 8


# -- /embed and /predict ---------------------------------------------------------------------
def test_embed_texts_has_the_librarys_per_item_errors(server, models):
    items = ["the card was declined", 3, None, "", "how do I top up?"]
    expected = library(models, "text", items)
    body = post(server, "/embed", json={"model": "tiny-text", "texts": items}).json()
    assert body["ok"] == expected.ok.tolist() == [True, False, False, True, True]
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(e.index, e.code) for e in expected.errors]
    assert body["data"][1] is None and body["data"][2] is None
    good = np.array([body["data"][i] for i in (0, 3, 4)])
    np.testing.assert_allclose(good, expected.vectors[[0, 3, 4]], atol=1e-5)


def test_embed_images_json_and_multipart_equal_library(server, models, tmp_path):
    big = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (1200, 1000), (10, 200, 30)).save(big, "PNG")  # 1.2 Mpx > --max-pixels 1e6
    on_disk = tmp_path / "photo.png"
    on_disk.write_bytes(png(9))
    payloads = [png(1), b"not an image at all", png(2), big.getvalue()]
    expected = embedkit.embed(payloads, backbone=str(models["image"].path), max_pixels=1_000_000)
    assert expected.ok.tolist() == [True, False, True, False]

    sent = [base64.b64encode(p).decode() for p in payloads] + ["%%%not-base64%%%", str(on_disk)]
    body = post(server, "/embed", json={"model": "tiny-image", "images": sent}).json()
    assert body["ok"] == [True, False, True, False, False, False]
    codes = {e["index"]: e["code"] for e in body["errors"]}
    assert codes == {**{e.index: e.code for e in expected.errors}, 4: "invalid_base64", 5: "invalid_base64"}
    assert codes[3] == "too_large"
    np.testing.assert_allclose(np.array([body["data"][0], body["data"][2]]), expected.vectors[[0, 2]], atol=1e-5)

    files = [("images", (f"{k}.png", p, "image/png")) for k, p in enumerate(payloads)]
    form = post(server, "/embed", files=files, data={"model": "tiny-image"}).json()
    assert form["ok"] == expected.ok.tolist()
    np.testing.assert_allclose(np.array([form["data"][0], form["data"][2]]), expected.vectors[[0, 2]], atol=1e-5)


def test_predict_equals_the_saved_pipeline(server, models):
    pipeline = embedkit.load(models["saved"])
    queries = ["my card got declined", "top up failed", 7]
    body = post(server, "/predict", json={"model": "intent", "inputs": queries}).json()
    assert body["ok"] == [True, True, False] and body["errors"][0]["code"] == "not_text"
    assert [p["label"] for p in body["predictions"][:2]] == pipeline.predict(queries[:2]).tolist()
    proba = pipeline.predict_proba(queries[:2])
    classes = [str(c) for c in pipeline.classes_]
    got = np.array([[p["probabilities"][c] for c in classes] for p in body["predictions"][:2]])
    np.testing.assert_allclose(got, proba, atol=1e-5)
    assert body["predictions"][2] is None
    # a saved model is not an embedding backbone, and a backbone does not predict
    assert post(server, "/predict", json={"model": "tiny-text", "inputs": ["x"]}).status_code == 404


def test_models_health_ready_and_metrics(server):
    listed = httpx.get(server.url + "/v1/models", headers=server.headers).json()
    assert {(m["id"], m["kind"], m["modality"]) for m in listed["data"]} == {
        ("tiny-text", "backbone", "text"), ("tiny-image", "backbone", "image"), ("intent", "model", "text")}
    assert all(set(m) >= {"id", "object", "owned_by", "dim"} and "path" not in m for m in listed["data"])
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # open: no key
    assert httpx.get(server.url + "/ready", headers=server.headers).status_code == 200
    post(server, "/embed", json={"model": "tiny-text", "texts": ["one", 2, "three"]})
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert metric(text, "embedkit_requests_total", route="/embed", status="200") >= 1
    assert metric(text, "embedkit_request_seconds_count", route="/embed") >= 1
    assert metric(text, "embedkit_batch_size_count", model="tiny-serve-text") >= 1
    assert metric(text, "embedkit_items_embedded_total", model="tiny-serve-text") >= 2
    assert metric(text, "embedkit_item_errors_total", code="not_text") >= 1
    assert 'embedkit_queue_depth{model="tiny-serve-text"} 0.0' in text


# -- security and typed errors -------------------------------------------------------------
def test_api_key_is_required_everywhere_but_health(server):
    for path in ("/ready", "/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer"}):
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200


def test_binds_loopback_only_by_default(server):
    psutil = pytest.importorskip("psutil")
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections() if c.status == "LISTEN"]
    assert listening and all(a.ip == "127.0.0.1" for a in listening)


JSON_TYPE = {"Content-Type": "application/json"}
BAD = [
    # (path, request kwargs, status, code)
    ("/v1/embeddings", {"content": b'{"input": ["' + SECRET.encode() + b'"', "headers": JSON_TYPE}, 400, "invalid_json"),
    ("/v1/embeddings", {"content": b"\xff\xfe" + SECRET.encode(), "headers": JSON_TYPE}, 400, "invalid_json"),
    ("/v1/embeddings", {"json": [SECRET]}, 422, "invalid_type"),
    ("/v1/embeddings", {"json": {"input": 5}}, 422, "invalid_type"),
    ("/v1/embeddings", {"json": {"input": [SECRET, 5]}}, 422, "invalid_type"),
    ("/v1/embeddings", {"json": {"model": 3, "input": SECRET}}, 422, "invalid_type"),
    ("/v1/embeddings", {"json": {"model": "tiny-text"}}, 422, "missing_input"),
    ("/v1/embeddings", {"json": {"input": []}}, 422, "empty_input"),
    ("/v1/embeddings", {"json": {"input": ""}}, 422, "empty_input"),
    ("/v1/embeddings", {"json": {"input": [[101, 2023], [7]]}}, 422, "token_ids_unsupported"),
    ("/v1/embeddings", {"json": {"input": [101, 2023]}}, 422, "token_ids_unsupported"),
    ("/v1/embeddings", {"json": {"input": SECRET, "dimensions": 9}}, 422, "unsupported_dimensions"),  # D is 8
    ("/v1/embeddings", {"json": {"input": SECRET, "encoding_format": "int4"}}, 422, "invalid_encoding_format"),
    ("/v1/embeddings", {"json": {"input": SECRET, "encoding_format": "int8"}}, 422, "calibration_required"),
    ("/v1/embeddings", {"json": {"input": SECRET, "model": "tiny-image"}}, 422, "wrong_modality"),
    ("/v1/embeddings", {"json": {"input": SECRET, "model": "no-such-" + SECRET}}, 404, "model_not_found"),
    ("/v1/embeddings", {"json": {"input": SECRET, "model": "/etc/passwd"}}, 404, "model_not_found"),
    ("/v1/embeddings", {"json": {"input": SECRET, "model": str(ROOT / "models")}}, 404, "model_not_found"),
    ("/v1/embeddings", {"json": {"input": ["x"] * 33}}, 413, "too_many_items"),
    ("/v1/embeddings", {"json": {"input": [SECRET * 100]}}, 413, "text_too_long"),
    ("/v1/embeddings", {"json": {"input": [SECRET] * 10_000}}, 413, "body_too_large"),
    ("/v1/embeddings", {"content": lambda: (SECRET.encode() * 20_000 for _ in range(3)), "headers": JSON_TYPE},
     413, "body_too_large"),  # chunked
    ("/embed", {"json": {"texts": SECRET}}, 422, "invalid_type"),
    ("/embed", {"json": {"texts": [SECRET], "images": []}}, 422, "invalid_request"),
    ("/embed", {"json": {}}, 422, "invalid_request"),
    ("/embed", {"json": {"texts": []}}, 422, "empty_input"),
    ("/embed", {"json": {"model": "tiny-text", "images": ["aGVsbG8="]}}, 422, "wrong_modality"),
    ("/embed", {"files": [("images", ("a.png", b"x" * 300_000, "image/png"))]}, 413, "body_too_large"),
    ("/embed", {"files": [("images", (f"{k}.png", b"x", "image/png")) for k in range(40)]}, 413, "too_many_items"),
    ("/predict", {"json": {"model": "intent", "inputs": "one string"}}, 422, "invalid_type"),
    ("/predict", {"json": {"model": "nope", "inputs": ["x"]}}, 404, "model_not_found"),
    (f"/{SECRET}", {"json": {}}, 404, "not_found"),  # the path is input too: never echoed
]


@pytest.mark.parametrize("path,kwargs,status,code", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_gets_a_typed_error_without_the_input(server, path, kwargs, status, code):
    r = post(server, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] and error["message"]
    assert SECRET not in r.text and "/etc/passwd" not in r.text and str(ROOT) not in r.text


def test_good_request_after_the_bad_request_suite(server, models):
    for path, kwargs, status, _ in BAD:  # the whole suite again, then a good request
        assert post(server, path, **kwargs).status_code == status
    r = post(server, "/v1/embeddings", json={"model": "tiny-text", "input": TEXTS})
    assert r.status_code == 200
    np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]),
                               library(models, "text", TEXTS).vectors, atol=1e-5)


# -- batching under concurrency --------------------------------------------------------------
def test_concurrent_requests_are_batched_together_and_equal_the_library(server, models):
    before = httpx.get(server.url + "/metrics", headers=server.headers).text
    requests = [[f"request {k} item {j} " + "word " * (k % 7) for j in range(4)] for k in range(32)]

    async def run():
        async with httpx.AsyncClient(headers=server.headers, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(
                client.post(server.url + "/embed", json={"model": "tiny-text", "texts": texts}) for texts in requests
            )), 60)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 32
    got = np.array([row for r in responses for row in r.json()["data"]])
    np.testing.assert_allclose(got, library(models, "text", [t for ts in requests for t in ts]).vectors, atol=1e-5)
    after = httpx.get(server.url + "/metrics", headers=server.headers).text
    batches = (metric(after, "embedkit_batch_size_count", model="tiny-serve-text")
               - metric(before, "embedkit_batch_size_count", model="tiny-serve-text"))
    items = (metric(after, "embedkit_batch_size_sum", model="tiny-serve-text")
             - metric(before, "embedkit_batch_size_sum", model="tiny-serve-text"))
    assert items == 128
    assert batches < 32, f"{batches} batches for 32 concurrent requests: nothing was coalesced"


def test_queue_full_429_disconnect_drops_and_not_ready_503(models):
    srv = Server("--backbone", str(models["text"].path), "--max-queue", "4", "--max-wait-ms", "1500",
                 "--max-batch-tokens", "100000", env={"EMBEDKIT_API_KEY": KEY}, key=KEY)
    srv.launch()
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:  # while loading: /ready and the routes answer 503
            try:
                r = httpx.get(srv.url + "/ready", headers=srv.headers, timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert r.headers["retry-after"] == "1"
        assert seen[-1] == 200
        assert httpx.get(srv.url + "/ready").status_code == 401  # the key came from EMBEDKIT_API_KEY

        async def run():
            async with httpx.AsyncClient(headers=srv.headers, timeout=30) as client:
                first = asyncio.ensure_future(client.post(srv.url + "/embed", json={"texts": ["a", "b", "c"]}))
                await asyncio.sleep(0.5)  # the three items wait (max-wait 1.5 s) in a queue of 4
                second = await client.post(srv.url + "/embed", json={"texts": ["d", "e", "f"]})
                return await first, second

        first, second = asyncio.run(run())
        assert first.status_code == 200 and first.json()["ok"] == [True] * 3
        assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
        assert int(second.headers["retry-after"]) >= 1

        # A client that gives up: its queued items are dropped, not embedded.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/embed", json={"texts": ["g", "h", "i"]}, headers=srv.headers, timeout=0.4)
        for _ in range(50):
            text = httpx.get(srv.url + "/metrics", headers=srv.headers).text
            if metric(text, "embedkit_items_dropped_total") == 3:
                break
            time.sleep(0.1)
        assert metric(text, "embedkit_items_dropped_total") == 3
        time.sleep(1.6)  # past the max wait: dropped items must not have been run
        text = httpx.get(srv.url + "/metrics", headers=srv.headers).text
        assert metric(text, "embedkit_items_embedded_total") == 3
        assert metric(text, "embedkit_queue_depth") == 0
        assert metric(text, "embedkit_requests_total", route="/embed", status="429") == 1
    finally:
        assert srv.stop() == 0


def test_sigterm_drains_every_accepted_request_and_exits_0(models):
    srv = Server("--backbone", str(models["text"].path), "--max-wait-ms", "150").start()
    texts = [f"text number {k}" for k in range(8)]
    expected = library(models, "text", texts).vectors
    outcomes: list[tuple[float, float, int | str]] = []

    async def client(http: httpx.AsyncClient, stop_at: float) -> None:
        for _ in range(200):  # bounded in count and in time
            if time.monotonic() > stop_at:
                return
            start = time.monotonic()
            try:
                r = await http.post(srv.url + "/v1/embeddings", json={"input": texts})
            except httpx.TransportError as exc:  # the server stopped accepting: not an accepted request
                outcomes.append((start, time.monotonic(), type(exc).__name__))
                return
            outcomes.append((start, time.monotonic(), r.status_code))
            if r.status_code == 200:
                got = np.array([d["embedding"] for d in r.json()["data"]])
                np.testing.assert_allclose(got, expected, atol=1e-5)

    async def run() -> float:
        async with httpx.AsyncClient(timeout=30) as http:
            tasks = [asyncio.ensure_future(client(http, time.monotonic() + 20)) for _ in range(8)]
            await asyncio.sleep(1.0)
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), 40)
            return signalled

    signalled = asyncio.run(run())
    code = srv.stop()
    statuses = [s for _, _, s in outcomes if isinstance(s, int)]
    assert statuses and set(statuses) == {200}, statuses
    in_flight = [o for o in outcomes if o[0] < signalled < o[1] and o[2] == 200]
    assert in_flight, "no request was in flight when SIGTERM came"
    assert code == 0, srv.stderr[-2000:]


def test_unknown_backbone_exits_1_naming_it(models):
    srv = Server("--backbone", "no-such-backbone")
    srv.launch()
    try:
        srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    code = srv.stop()
    assert code == 1 and "no-such-backbone" in srv.stderr


def test_unreadable_or_empty_api_key_file_exits_1(tmp_path):
    from support import run_cli

    missing = run_cli("serve", "--api-key-file", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "--api-key-file" in missing.stderr
    (tmp_path / "empty").write_text("\n")
    empty = run_cli("serve", "--api-key-file", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "API key is empty" in empty.stderr


# -- README ------------------------------------------------------------------------------------
def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Serving", 1)[1].split("\n## ", 1)[0]


def test_readme_serving_examples_run(server, models):
    """The README's curl and openai examples, against the test server (its tiny backbone named as
    the README's, its port)."""
    import contextlib

    def local(text: str) -> str:
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}").replace('"minilm-l6"', '"tiny-text"')

    body = _section()
    env = {**os.environ, "EMBEDKIT_API_KEY": KEY}
    curls = [local(c) for c in re.findall(r"^curl .*$", re.sub(r"\\\n\s*", "", body), re.M)]
    assert len(curls) >= 3
    for command in curls:
        out = subprocess.run(["bash", "-c", command + " -sS -f"], capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, (command, out.stderr)
        assert '"data"' in out.stdout or '"predictions"' in out.stdout
    code = local(re.findall(r"```python\n(.*?)```", body, re.S)[0])
    expected = [line.split("# ", 1)[1].strip() for line in code.splitlines() if line.startswith("print(") and "# " in line]
    buffer = io.StringIO()
    old = os.environ.get("EMBEDKIT_API_KEY")
    os.environ["EMBEDKIT_API_KEY"] = KEY
    try:
        with contextlib.redirect_stdout(buffer):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        if old is None:
            os.environ.pop("EMBEDKIT_API_KEY")
        else:
            os.environ["EMBEDKIT_API_KEY"] = old
    assert expected and buffer.getvalue().splitlines() == expected
