"""`embedkit serve` under concurrent load, against a real server process on this machine.

1, 8, 32 and 64 concurrent async httpx clients, each sending requests of 1 and of 16 Banking77
texts one after another to ``/v1/embeddings`` (MiniLM-L6 by default): texts/s, requests/s, p50
and p99 latency, errors. The ratio that matters: throughput at 32 clients over one request at
a time (dynamic batching should give >= 3x). With ``--infinity PYTHON`` the same load runs
against infinity-emb (``PYTHON -m infinity_emb v2``, CPU, the same MiniLM folder by path), side
by side: both servers run at once and the loads alternate between them. ``--images N``:
mobilenet-v2 images/s through ``/embed`` (multipart JPEGs, 8 clients) vs ``embedkit.embed``.
``--rss 1000,100000`` prints the server's RSS after that many small requests. ``--mixed 64``: the
fairness load of issue 22 at 64 clients: p50/p99 of small requests (1 text) alone, then with 10 %
of requests carrying 2,048 texts, on every target (with ``--infinity``, side by side).

Every load is bounded in requests and in seconds. The client runs on the same cores as the
server (say so when reading the figures). The in-process ``embedkit.embed`` rate on the same
texts is printed before and after as the ceiling no server on these cores can pass.

infinity-emb, offline, in its own venv sharing the project's CPU torch (0.0.78 needs
transformers < 5 and sentence-transformers < 4; the project's are newer)::

    python3 -m venv .bench/infinity
    echo "$PWD/.venv/lib/python3.11/site-packages" > .bench/infinity/lib/python3.11/site-packages/main.pth
    .bench/infinity/bin/pip install "infinity-emb[server]==0.0.78" "transformers>=4.47,<5" \
        "sentence-transformers>=3.0.1,<4" "numpy<2" "huggingface_hub<1"

    .venv/bin/python benchmarks/serve.py [--clients 1,8,32,64] [--sizes 1,16] [--requests 400]
        [--seconds 30] [--infinity .bench/infinity/bin/python] [--rss 1000,100000] [--images 200]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "banking77" / "test.csv"
sys.path.insert(0, str(ROOT / "tests"))


def texts() -> list[str]:
    with open(DATA, newline="", encoding="utf-8") as f:
        return [r["text"] for r in csv.DictReader(f)]


async def load(url: str, path: str, model: str, pool: list[str], clients: int, size: int, requests: int,
               seconds: float, headers: dict[str, str]) -> dict[str, float]:
    """``requests`` requests of ``size`` texts from ``clients`` concurrent clients (or until ``seconds``)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.monotonic() < stop:
            start = (sent * size) % (len(pool) - size)
            sent += 1
            t = time.perf_counter()
            try:
                r = await http.post(url + path, json={"model": model, "input": pool[start:start + size]})
                ok = r.status_code == 200 and len(r.json()["data"]) == size
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

    # One client, one connection, made before the clock starts: httpx's shared pool costs more
    # CPU per request as it grows (about 2 ms at 1 connection, 9 ms at 64 here), and each new
    # client builds an SSL context; either would measure the load generator, not the server.
    https = [httpx.AsyncClient(timeout=60, headers=headers) for _ in range(clients)]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for http in https))
        wall = time.perf_counter() - t0
    finally:
        for http in https:
            await http.aclose()
    latencies.sort()
    done = len(latencies)
    return {"requests": done, "texts_s": (done - errors) * size / wall, "req_s": done / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(done - 1, int(0.99 * done))], "errors": errors}


def run_suite(targets: list[tuple[str, str, str, str]], args: argparse.Namespace,
              pool: list[str]) -> dict[tuple[str, int, int], dict[str, float]]:
    """Each (size, clients) load ``args.rounds`` times on every target (name, url, path, model),
    interleaved (target within client count within round), so that the machine's other load
    falls on all of them alike; the median round is reported."""
    for _, url, path, model in targets:
        asyncio.run(load(url, path, model, pool, 4, 16, 40, 30, {}))  # warm-up
    results = {}
    for size in args.sizes:
        rounds: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for clients in args.clients:
                for name, url, path, model in targets:
                    rounds.setdefault((name, clients), []).append(
                        asyncio.run(load(url, path, model, pool, clients, size, args.requests, args.seconds, {})))
        for (name, clients), runs in sorted(rounds.items()):
            runs.sort(key=lambda r: r["texts_s"])
            r = dict(runs[len(runs) // 2])
            r["errors"] = sum(x["errors"] for x in runs)
            r["requests"] = sum(x["requests"] for x in runs)
            results[(name, size, clients)] = r
            each = ", ".join(f"{x['texts_s']:.0f}" for x in runs)
            print(f"{name:9s} {size:3d} texts/req {clients:3d} clients: {r['texts_s']:8.1f} texts/s "
                  f"{r['req_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                  f"errors {r['errors']} of {r['requests']} (median of {len(runs)} rounds: {each} texts/s)",
                  flush=True)
    for name, *_ in targets:
        for size in args.sizes:
            if (name, size, 1) in results and (name, size, 32) in results:
                print(f"{name}: {size} texts/req: 32 clients / 1 at a time = "
                      f"{results[(name, size, 32)]['texts_s'] / results[(name, size, 1)]['texts_s']:.2f}x", flush=True)
    if len(targets) == 2:
        a, b = targets[0][0], targets[1][0]
        for size in args.sizes:
            if (a, size, 32) in results and (b, size, 32) in results:
                x, y = results[(a, size, 32)], results[(b, size, 32)]
                print(f"{a} / {b} at 32 clients, {size} texts/req: throughput {x['texts_s'] / y['texts_s']:.2f}x, "
                      f"p99 {x['p99_ms']:.0f} vs {y['p99_ms']:.0f} ms", flush=True)
    return results


async def mixed_load(url: str, path: str, model: str, pool: list[str], clients: int, large_share: float,
                     large_size: int, requests: int, seconds: float) -> dict[str, float]:
    """Small (1 text) and large (``large_size`` texts, every 1/``large_share``-th request) requests
    from ``clients`` clients: the latency of the small ones."""
    import httpx

    small: list[float] = []
    large: list[float] = []
    errors = 0
    codes: collections.Counter[str] = collections.Counter()
    sent = 0
    stop = time.monotonic() + seconds
    every = round(1 / large_share) if large_share else 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.monotonic() < stop:
            k = sent
            sent += 1
            size = large_size if every and k % every == every - 1 else 1
            start = (k * 7) % (len(pool) - size)
            t = time.perf_counter()
            try:
                r = await http.post(url + path, json={"model": model, "input": pool[start:start + size]})
                ok = r.status_code == 200
                if not ok:
                    codes[f"{'large' if size > 1 else 'small'} {r.status_code}"] += 1
            except httpx.HTTPError as exc:
                ok = False
                codes[type(exc).__name__] += 1
            (large if size > 1 else small).append(time.perf_counter() - t)
            errors += not ok

    https = [httpx.AsyncClient(timeout=300) for _ in range(clients)]
    try:
        await asyncio.gather(*(client(http) for http in https))
    finally:
        for http in https:
            await http.aclose()
    small.sort()
    n = len(small)
    return {"small": n, "large": len(large), "errors": errors, "codes": dict(codes), "p50_ms": 1000 * statistics.median(small),
            "p99_ms": 1000 * small[min(n - 1, int(0.99 * n))], "max_ms": 1000 * small[-1]}


def run_mixed(targets: list[tuple[str, str, str, str]], args: argparse.Namespace, pool: list[str]) -> None:
    for share in (0.0, 0.1):
        for name, url, path, model in targets:
            r = asyncio.run(mixed_load(url, path, model, pool, args.mixed, share, 2048, args.requests, args.seconds))
            print(f"{name:9s} mixed {args.mixed} clients, {share:.0%} of requests 2048 texts: small requests "
                  f"p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms max {r['max_ms']:.0f} ms "
                  f"({r['small']} small, {r['large']} large, {r['errors']} errors{': ' if r['codes'] else ''}"
                  f"{', '.join(f'{k} x{v}' for k, v in r['codes'].items())})", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def infinity(python: str) -> Iterator[tuple[str, str, str, str] | None]:
    """infinity-emb serving the same MiniLM folder by path, on CPU; yields its target or None."""
    import httpx

    from embedkit_text import minilm_folder

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(ROOT / ".bench" / "infinity-serve.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
    proc = subprocess.Popen([python, "-m", "infinity_emb.cli", "v2", "--model-id", str(minilm_folder()),
                             "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--engine", "torch",
                             "--no-bettertransformer"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        target = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                print(f"infinity-emb exited {proc.returncode}; see .bench/infinity-serve.log")
                break
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    target = ("infinity", url, "/embeddings", httpx.get(url + "/models").json()["data"][0]["id"])
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            print("infinity-emb was not ready within 300 s")
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss(server, counts: list[int], pool: list[str], clients: int = 8) -> None:
    """The server's RSS (and its peak, VmHWM) after each count of small requests, sent by
    ``clients`` threads at once (one text each, every one checked for 200)."""
    import threading

    import httpx
    import psutil

    process = psutil.Process(server.proc.pid)
    done = 0
    lock = threading.Lock()

    def client(target: int) -> None:
        nonlocal done
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    if done >= target:
                        return
                    k = done
                    done += 1
                r = http.post(server.url + "/v1/embeddings", json={"input": pool[k % len(pool)]})
                assert r.status_code == 200, r.text

    for target in counts:
        start, before = time.monotonic(), done
        threads = [threading.Thread(target=client, args=(target,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = next((line.split()[1] for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
                     if line.startswith("VmHWM")), "0")
        print(f"server RSS after {done:7d} small requests ({clients} clients): {process.memory_info().rss / 2**20:7.1f} "
              f"MiB, peak {int(peak) / 1024:7.1f} MiB ({done - before} requests in {time.monotonic() - start:.0f} s)",
              flush=True)


def ceiling(backbone: str, pool: list[str], n: int = 512) -> float:
    """texts/s of ``embedkit.embed`` in this process on ``n`` texts (after one warm-up call)."""
    import embedkit

    embedkit.embed(pool[:32], backbone=backbone)
    t = time.perf_counter()
    embedkit.embed(pool[:n], backbone=backbone)
    return n / (time.perf_counter() - t)


async def image_load(url: str, files: list[bytes], clients: int, per_request: int, requests: int,
                     seconds: float) -> dict[str, float]:
    """``requests`` multipart /embed requests of ``per_request`` JPEGs from ``clients`` clients."""
    import httpx

    latencies: list[float] = []
    errors = sent = 0
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.monotonic() < stop:
            start = (sent * per_request) % (len(files) - per_request)
            sent += 1
            t = time.perf_counter()
            parts = [("images", (f"{k}.jpg", files[start + k], "image/jpeg")) for k in range(per_request)]
            try:
                r = await http.post(url + "/embed", files=parts, data={"model": "mobilenet-v2"})
                ok = r.status_code == 200 and all(r.json()["ok"])
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"images_s": (len(latencies) - errors) * per_request / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "errors": errors,
            "requests": len(latencies)}


def images(args: argparse.Namespace) -> None:
    """mobilenet-v2 images/s through /embed (multipart JPEGs, 8 clients) vs embedkit.embed in process."""
    from serving import Server

    import embedkit

    paths = sorted((ROOT.parent / "shared" / "data" / "images" / "hymenoptera").rglob("*.jpg"))[: args.images]
    files = [p.read_bytes() for p in paths]
    embedkit.embed(paths[:8], backbone="mobilenet-v2")  # export on first use, warm-up
    t = time.perf_counter()
    embedkit.embed(paths, backbone="mobilenet-v2")
    print(f"mobilenet-v2 embedkit.embed in process: {len(paths) / (time.perf_counter() - t):.1f} images/s "
          f"({len(paths)} JPEGs, decoding included)", flush=True)
    with Server("--backbone", "mobilenet-v2", grace=60) as server:
        asyncio.run(image_load(server.url, files, 2, 4, 4, 30))  # warm-up
        r = asyncio.run(image_load(server.url, files, 8, 4, len(paths) // 4, args.seconds * 4))
        print(f"mobilenet-v2 /embed, 8 clients x 4 JPEGs (multipart): {r['images_s']:.1f} images/s, "
              f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, errors {r['errors']} of {r['requests']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--sizes", default="1,16")
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration at most")
    parser.add_argument("--seconds", type=float, default=30, help="seconds per configuration at most")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--max-batch-tokens", default="", help="default: the server's (the encoder's budget)")
    parser.add_argument("--max-wait-ms", default="2")
    parser.add_argument("--infinity", help="python of a venv with infinity-emb (e.g. .bench/infinity/bin/python)")
    parser.add_argument("--images", type=int, default=0, help="also mobilenet-v2 /embed on this many JPEGs")
    parser.add_argument("--rss", default="", help="e.g. 1000,100000: RSS after that many small requests")
    parser.add_argument("--mixed", type=int, default=0, help="clients of the mixed (fairness) load; 0: skip")
    parser.add_argument("--no-suite", action="store_true", help="skip the 1/8/32/64-client throughput suite")
    args = parser.parse_args()
    args.clients = [int(x) for x in args.clients.split(",")]
    args.sizes = [int(x) for x in args.sizes.split(",")]

    from serving import Server

    pool = texts()
    print(f"CPU: {cpu()}")
    print(f"Banking77 test: {len(pool)} texts; backbone {args.backbone}; "
          f"max-batch-tokens {args.max_batch_tokens or 'default'}, "
          f"max-wait-ms {args.max_wait_ms}; client and server share this machine", flush=True)
    print(f"embedkit.embed in process: {ceiling(args.backbone, pool):.1f} texts/s (before)", flush=True)
    tokens = ["--max-batch-tokens", args.max_batch_tokens] if args.max_batch_tokens else []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Server("--backbone", args.backbone, *tokens, "--max-wait-ms", args.max_wait_ms,
                                            grace=60))
        targets = [("embedkit", server.url, "/v1/embeddings", args.backbone)]
        if args.infinity:
            other = stack.enter_context(infinity(args.infinity))
            if other is not None:
                targets.append(other)
        if not args.no_suite:
            run_suite(targets, args, pool)
        if args.mixed:
            run_mixed(targets, args, pool)
        if args.rss:
            rss(server, [int(x) for x in args.rss.split(",")], pool)
    print(f"embedkit.embed in process: {ceiling(args.backbone, pool):.1f} texts/s (after)", flush=True)
    if args.images:
        images(args)


if __name__ == "__main__":
    main()
