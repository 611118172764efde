"""``embedkit serve`` under hostile use, as a real subprocess on 127.0.0.1 (issue 22): cross-origin
and DNS-rebinding requests, malformed input, the drain deadline, stalled connections, bounded memory.

Every server is stopped at the end; every loop is bounded in count and time. Time limits are
asserted with margins of several seconds over the configured limit (the machine is shared and
loaded): a property (closed, typed, exited), never a race.
"""
from __future__ import annotations

import asyncio
import base64
import io
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from serving import ROOT, Server, metric  # noqa: E402
from tiny import Pooled, TinyConv, png, text_backbone  # noqa: E402

import embedkit  # noqa: E402

KEY = "k3y-for-hostile-tests"
JSON_TYPE = {"Content-Type": "application/json"}



@pytest.fixture(scope="module")
def models():
    text = embedkit.export(text_backbone("tiny-serve-text", lambda: Pooled(dim=8)))
    image = embedkit.export(embedkit.Backbone(
        name="tiny-serve-image", modality="image", dim=8, weights="random", license="MIT",
        preprocess=embedkit.ImagePreprocess(crop=(32, 32), resize=32), builder=TinyConv,
    ))
    return {"text": text, "image": image}


@pytest.fixture(scope="module")
def open_server(models):
    """No API key (the default): the Host and Origin checks are on."""
    with Server("--backbone", f"tiny-text={models['text'].path}", "--backbone", f"tiny-image={models['image'].path}",
                "--allowed-host", "embed.internal", "--allowed-origin", "https://app.example") as s:
        yield s
    assert "Traceback" not in s.stderr, s.stderr[-3000:]


def raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection; what comes back until the server closes (or ``wait`` s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


# -- (1) cross-origin use and DNS rebinding ------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_json_routes_take_application_json_only(open_server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    body = b'{"input": "card declined"}'
    for path in ("/v1/embeddings", "/embed", "/predict"):
        if path != "/v1/embeddings" and content_type and content_type.startswith("multipart"):
            continue  # a form of images is taken on /embed and /predict
        r = httpx.post(open_server.url + path, content=body, headers=headers, timeout=30)
        assert r.status_code == 415, (path, content_type, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(open_server.url + "/v1/embeddings", content=body,
                    headers={"Content-Type": "application/json; charset=utf-8"}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize("host,status", [("evil.example", 421), (f"evil.example:{8000}", 421), ("10.0.0.7", 421),
                                         ("localhost", 200), ("127.0.0.1", 200), ("[::1]", 200),
                                         ("embed.internal", 200), ("EMBED.INTERNAL:9", 200)])
def test_host_header_is_checked_without_a_key(open_server, host, status):
    r = httpx.post(open_server.url + "/v1/embeddings", json={"input": "x"}, headers={"Host": host}, timeout=30)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(open_server.url + "/health", headers={"Host": host}).status_code == 200  # probes


@pytest.mark.parametrize("origin,status", [("http://evil.example", 403), ("null", 403),
                                           ("http://localhost:3000", 200), ("http://127.0.0.1:5173", 200),
                                           ("https://app.example", 200), ("https://app.example.evil", 403)])
def test_browser_origin_is_checked(open_server, origin, status):
    for path, kw in (("/v1/embeddings", {"json": {"input": "x"}}), ("/v1/models", {})):
        method = httpx.post if kw else httpx.get
        r = method(open_server.url + path, headers={"Origin": origin}, timeout=30, **kw)
        assert r.status_code == status, (path, r.text)
        if status != 200:
            assert r.json()["error"]["code"] == "origin_not_allowed"


def test_with_a_key_the_host_is_free_but_origins_are_still_checked(models):
    with Server("--backbone", str(models["text"].path), env={"EMBEDKIT_API_KEY": KEY}, key=KEY) as srv:
        auth = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}, headers={**auth, "Host": "svc.example"})
        assert r.status_code == 200
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}, headers={**auth, "Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"


# -- (6) malformed input: typed 4xx, costing only itself -------------------------------------
MALFORMED = [
    (b"[" * 50_000, 413, "too_many_values"),  # 50 KB of '[': refused before parsing
    (b"[" * 2_000, 400, "invalid_json"),  # nested past the parser's depth
    (b'{"input": ' + b"9" * 5_000 + b"}", 400, "invalid_json"),  # an int of over 4,300 digits
    (b'{"input": "x", "junk": [' + b"{}," * 300_000 + b"{}]}", 413, "too_many_values"),  # amplifying filler
    (b'{"input": "x", "junk": [' + b'"",' * 5_000 + b'""]}', 413, "too_many_values"),
]


@pytest.mark.parametrize("body,status,code", MALFORMED, ids=[m[2] + str(i) for i, m in enumerate(MALFORMED)])
def test_malformed_json_is_a_typed_4xx(open_server, body, status, code):
    r = httpx.post(open_server.url + "/v1/embeddings", content=body, headers=JSON_TYPE, timeout=60)
    assert r.status_code == status, r.text[:300]
    assert r.json()["error"]["code"] == code


def test_commas_inside_strings_are_not_values(open_server):
    texts = ["a, b, [c], {d}" * 50] * 20  # 6,000 commas and brackets, all inside strings
    r = httpx.post(open_server.url + "/embed", json={"model": "tiny-text", "texts": texts}, timeout=60)
    assert r.status_code == 200 and all(r.json()["ok"])


def test_a_bad_image_envelope_costs_its_item_only(open_server):
    good = base64.b64encode(png(1)).decode()
    images = ["data:image/png;base64", good, {"url": "x"}, "data:image/png," + good, "data:image/png;base64," + good, 7]
    r = httpx.post(open_server.url + "/embed", json={"model": "tiny-image", "images": images}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["ok"] == [False, True, False, False, True, False]
    assert {e["code"] for e in r.json()["errors"]} == {"invalid_base64"}


def test_multipart_texts_field_gets_a_form_error(open_server):
    r = httpx.post(open_server.url + "/embed", data={"model": "tiny-text", "texts": "hello"},
                   files=[("images", ("a.png", png(1), "image/png"))], timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_form"
    assert "texts as JSON" in r.json()["error"]["message"] and "image items" not in r.text


def test_bad_content_length_is_a_400_and_the_server_goes_on(open_server):
    reply = raw(open_server.port, b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 12abc\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]  # the HTTP parser's own answer (docs/serve.md)
    assert httpx.post(open_server.url + "/v1/embeddings", json={"input": "x"}).status_code == 200


def test_disconnect_mid_upload_is_a_499_not_a_500(open_server):
    before = httpx.get(open_server.url + "/metrics").text
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", open_server.port), timeout=5) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b'{"texts": ["' + b"a" * 1000)
            time.sleep(0.2)
    for _ in range(50):  # bounded: the server notices the disconnects
        after = httpx.get(open_server.url + "/metrics").text
        if metric(after, "embedkit_requests_total", route="/embed", status="499") >= 3 + metric(
                before, "embedkit_requests_total", route="/embed", status="499"):
            break
        time.sleep(0.1)
    assert metric(after, "embedkit_requests_total", route="/embed", status="499") >= 3
    assert metric(after, "embedkit_requests_total", status="500") == 0


def test_api_key_with_whitespace_is_refused_at_start(tmp_path):
    from support import run_cli

    for env in ({"EMBEDKIT_API_KEY": "k "}, {"EMBEDKIT_API_KEY": " k"}):
        out = run_cli("serve", "--backbone", "no-such", env=env)
        assert out.returncode == 1 and "whitespace" in out.stderr, out.stderr[-500:]
    out = run_cli("serve", "--api-key", "a b")
    assert out.returncode == 1 and "whitespace" in out.stderr


# -- (7) the small things -----------------------------------------------------------------------
def test_help_gives_every_default():
    from support import run_cli

    out = run_cli("serve", "--help").stdout
    flat = " ".join(out.split())
    for option, default in (("--max-items", "2048"), ("--max-chars", "100000"), ("--max-body-bytes", "16777216"),
                            ("--max-queue", "4096"), ("--max-wait-ms", "2"), ("--drain-seconds", "30"),
                            ("--max-pixels", "16777216"), ("--header-timeout", "10"), ("--body-timeout", "60"),
                            ("--keep-alive", "5"), ("--max-connections", "1000"), ("--max-inflight-bytes", "67108864")):
        part = flat.split(option + " ", 2)[-1][:400]
        assert f"default {default}" in part, (option, part)
    assert "3 the address cannot be bound" in flat


def _lines(proc: subprocess.Popen) -> "queue.Queue[str]":
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    return lines


def test_port_0_prints_the_bound_port_and_port_in_use_exits_3(models):
    srv = Server("--backbone", str(models["text"].path))
    srv.args[srv.args.index("--port") + 1] = "0"
    srv.launch()
    try:
        lines, port, deadline = _lines(srv.proc), None, time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            try:
                m = re.search(r"http://127\.0\.0\.1:(\d+)", lines.get(timeout=1))
            except queue.Empty:
                continue
            port = int(m.group(1)) if m else None
        assert port and port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # the same port again: exit 3 (documented)
        busy = Server("--backbone", str(models["text"].path))
        busy.args[busy.args.index("--port") + 1] = str(port)
        busy.launch()
        try:
            assert busy.proc.wait(120) == 3
        finally:
            busy.stop()
    finally:
        assert srv.stop() == 0


# -- (4) a drain that is a deadline -------------------------------------------------------------
def test_drain_deadline_answers_503_and_exits(models):
    # Items wait up to 60 s for a batch to fill: a request that is still in flight at the deadline.
    srv = Server("--backbone", str(models["text"].path), "--max-wait-ms", "60000", "--max-batch-tokens", "100000",
                 "--drain-seconds", "2", grace=60).start()

    async def run() -> tuple[httpx.Response, float, float]:
        async with httpx.AsyncClient(timeout=60) as http:
            pending = asyncio.ensure_future(http.post(srv.url + "/embed", json={"texts": ["a", "b", "c"]}))
            await asyncio.sleep(1.0)
            signalled = time.monotonic()
            srv.proc.send_signal(15)
            r = await asyncio.wait_for(pending, 30)
            return r, signalled, time.monotonic()

    r, signalled, answered = asyncio.run(run())
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert answered - signalled < 2 + 8  # --drain-seconds + a margin for a loaded machine
    srv.proc.wait(30)
    exited = time.monotonic()
    assert exited - signalled < 2 + 2 + 10, exited - signalled  # + uvicorn's flush + margin
    assert srv.stop() == 0
    assert "Traceback" not in srv.stderr, srv.stderr[-3000:]


# -- (3) stalled connections --------------------------------------------------------------------
def test_stalled_connections_are_closed(models):
    with Server("--backbone", str(models["text"].path), "--header-timeout", "2", "--body-timeout", "2",
                "--keep-alive", "1", "--max-connections", "32") as srv:
        def closed_within(send: bytes, seconds: float) -> float:
            start = time.monotonic()
            raw(srv.port, send, wait=seconds + 10)
            return time.monotonic() - start

        assert closed_within(b"", 2) < 2 + 5  # idle: never sends
        assert closed_within(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\n", 2) < 2 + 5  # headers stalled
        half = (b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"texts\": [")
        assert closed_within(half, 2) < 2 + 5  # half a body
        # a complete request, then the connection idles: closed after --keep-alive
        ok = (b'{"texts": ["hi"]}')
        took = closed_within(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ok), ok), 1)
        assert took < 1 + 5

        # Over --max-connections idle sockets: a new request gets a 503 (not a reset), and once the
        # header timeout closed them, requests are served again.
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(40)]
        try:
            time.sleep(0.2)
            r = httpx.post(srv.url + "/embed", json={"texts": ["x"]}, timeout=30)
            assert r.status_code == 503
            # the service's JSON error, not uvicorn's plain text
            assert r.headers["content-type"] == "application/json" and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "too_many_connections"
        finally:
            for sock in idle:
                sock.close()
        assert httpx.post(srv.url + "/embed", json={"texts": ["x"]}, timeout=30).status_code == 200
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "embedkit_requests_total", status="500") == 0


# -- (2) bounded memory and the in-flight budget --------------------------------------------------
def test_maximal_json_bodies_stay_within_a_memory_bound(models):
    """16 concurrent 16 MiB bodies of ``{},`` (issue 22: +3.4 GB before). The in-flight budget holds
    at most 64 MiB of bodies (4 of them; the others get 429), each read once and joined once by the
    framework, never parsed (refused by value count: 413). Measured here: +155 MiB; bound 600 MiB
    (~4x, for allocator slack on a loaded machine)."""
    body = b'{"input": "x", "junk": [' + b"{}," * (16 * 2**20 // 3 - 20) + b"{}]}"
    assert len(body) <= 16 * 2**20
    with Server("--backbone", str(models["text"].path)) as srv:
        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.wait_for(asyncio.gather(*(
                    http.post(srv.url + "/v1/embeddings", content=body, headers=JSON_TYPE) for _ in range(16))), 300)

        idle, grown, responses = _peak_rss(srv.proc.pid, lambda: asyncio.run(run()))
        codes = {r.status_code: r.json()["error"]["code"] for r in responses}
        assert set(codes) <= {413, 429} and codes.get(413, "too_many_values") == "too_many_values", codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
        print(f"idle RSS {idle:.0f} MiB, peak +{grown:.0f} MiB, statuses {sorted(codes)}", file=sys.stderr)
        assert grown < 600, f"peak RSS grew {grown:.0f} MiB"


def _peak_rss(pid: int, work) -> tuple[float, float, object]:
    """(idle RSS MiB, peak growth MiB, work()) of process ``pid`` sampled every 20 ms during ``work``."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process(pid)
    idle = peak = proc.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        stop.set()
        sampler.join(5)
    return idle / 2**20, (peak - idle) / 2**20, result


def test_maximal_image_requests_stay_within_a_memory_bound_and_do_not_starve_text(models):
    """8 concurrent requests of 8 images at the service's pixel limit (4096 x 4096), then 8 of 8
    images of 9000 x 9000 (over it: refused from the header, issue 22: +1.47 GB each before).
    Images decode on their own pool (at most min(cores, 4) at once): measured here (2 cores) +653 MiB
    for the first load, +20 MiB for the second; bound 1500 MiB (~2.3x, one more image in flight
    than measured on a 4-core machine would stay within it).

    Meanwhile a ~100 KB text request to the other model (tokenised in a thread) is answered: issue
    22 measured 5-18 s behind one image request when both shared one pool."""
    from PIL import Image

    def solid(side: int) -> bytes:
        buf = io.BytesIO()
        Image.linear_gradient("L").resize((side, side)).convert("RGB").save(buf, "PNG")  # not blank
        return buf.getvalue()

    at_limit, over = solid(4096), solid(9000)
    assert 8 * len(at_limit) < 16 * 2**20 and 8 * len(over) < 16 * 2**20
    texts = [f"text {k} " + "word " * 400 for k in range(50)]  # ~100 KB
    with Server("--backbone", f"img={models['image'].path}", "--backbone", f"txt={models['text'].path}") as srv:
        def small() -> float:
            start = time.monotonic()
            r = httpx.post(srv.url + "/embed", json={"model": "txt", "texts": texts}, timeout=120)
            assert r.status_code == 200
            return time.monotonic() - start

        alone = min(small() for _ in range(3))
        during: list[float] = []

        async def run(payload: bytes) -> list[httpx.Response]:
            files = [("images", (f"{k}.png", payload, "image/png")) for k in range(8)]
            async with httpx.AsyncClient(timeout=300) as http:
                big = asyncio.gather(*(http.post(srv.url + "/embed", data={"model": "img"}, files=files)
                                       for _ in range(8)))
                if payload is at_limit:
                    for _ in range(3):  # small requests while the images decode
                        await asyncio.sleep(1.0)
                        during.append(await asyncio.get_running_loop().run_in_executor(None, small))
                return await asyncio.wait_for(big, 300)

        idle, grown, responses = _peak_rss(srv.proc.pid, lambda: asyncio.run(run(at_limit)))
        assert [r.status_code for r in responses] == [200] * 8
        assert all(r.json()["ok"] == [True] * 8 for r in responses), responses[0].json()["errors"]
        _, grown_over, responses = _peak_rss(srv.proc.pid, lambda: asyncio.run(run(over)))
        assert all(r.json()["ok"] == [False] * 8 for r in responses)
        assert {e["code"] for r in responses for e in r.json()["errors"]} == {"too_large"}
        print(f"idle RSS {idle:.0f} MiB; 8 x 8 images of 16.8 Mpx: peak +{grown:.0f} MiB; of 81 Mpx: "
              f"+{grown_over:.0f} MiB; ~100 KB text request alone {alone:.2f} s, during the images "
              f"{[round(t, 2) for t in during]} s", file=sys.stderr)
        assert grown < 1500 and grown_over < 1500, (grown, grown_over)
        assert max(during) < 5.0 + 10 * alone, (alone, during)


# -- (5) fairness between requests of one model ---------------------------------------------------
def test_a_small_request_waits_about_one_batch_behind_a_large_one(models):
    """2,048 texts that fill a batch each (--max-batch-tokens 64, one stream), then one small
    request: requests take turns leading a batch, so the small one is answered long before the
    large one (before, it waited for every item queued ahead of it)."""
    large = [f"item {k} " + "word " * 70 for k in range(2048)]
    with Server("--backbone", str(models["text"].path), "--max-batch-tokens", "64", "--streams", "1",
                "--max-wait-ms", "0") as srv:
        async def run() -> tuple[float, float]:
            async with httpx.AsyncClient(timeout=300) as http:
                t0 = time.monotonic()
                big = asyncio.ensure_future(http.post(srv.url + "/embed", json={"texts": large}))
                for _ in range(300):  # until the large request is parsed, tokenised and queued (bounded)
                    depth = metric((await http.get(srv.url + "/metrics")).text, "embedkit_queue_depth")
                    if depth >= 1000:
                        break
                    await asyncio.sleep(0.02)
                assert depth >= 1000, "the large request was never queued"
                t1 = time.monotonic()
                small = await http.post(srv.url + "/embed", json={"texts": ["hello"]})
                t2 = time.monotonic()
                assert small.status_code == 200
                r = await asyncio.wait_for(big, 300)
                assert r.status_code == 200 and all(r.json()["ok"])
                return t2 - t1, time.monotonic() - t0

        small_s, large_s = asyncio.run(run())
        print(f"small request {small_s:.2f} s while a 2048-batch request took {large_s:.2f} s", file=sys.stderr)
        assert small_s < large_s / 3, (small_s, large_s)


def test_readme_and_docs_name_the_defaults():
    docs = (ROOT / "docs" / "serve.md").read_text()
    for word in ("--allowed-host", "--allowed-origin", "--header-timeout", "--body-timeout", "--keep-alive",
                 "--max-connections", "--max-inflight-bytes", "unsupported_media_type", "host_not_allowed",
                 "origin_not_allowed", "too_many_values", "server_busy", "exit"):
        assert word in docs, word
    readme = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    assert "DNS rebinding" in readme
    multipart = [line for line in readme.splitlines() if "curl" in line and "-F" in line]
    assert multipart and all("Authorization" in line for line in multipart)
