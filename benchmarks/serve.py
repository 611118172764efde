"""`embedkit serve` under concurrent load, against a real server process on this machine.

1, 8, 32 and 64 concurrent async httpx clients, each sending requests of 1 and of 16 Banking77
texts one after another to ``/v1/embeddings`` (MiniLM-L6 by default): texts/s, requests/s, p50
and p99 latency, errors. The ratio that matters: throughput at 32 clients over one request at
a time (dynamic batching should give >= 3x). With ``--infinity PYTHON`` the same load runs
against infinity-emb (``PYTHON -m infinity_emb v2``, CPU, the same MiniLM folder by path), side
by side. ``--rss 1000,100000`` prints the server's RSS after that many small requests.

Every load is bounded in requests and in seconds. The client runs on the same cores as the
server (say so when reading the figures).

    .venv/bin/python benchmarks/serve.py [--clients 1,8,32,64] [--sizes 1,16] [--requests 400]
        [--seconds 30] [--infinity .bench/infinity/bin/python] [--rss 1000,100000]
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "banking77" / "test.csv"
sys.path.insert(0, str(ROOT / "tests"))

FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")


def cpu() -> str:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{model}; {os.cpu_count()} logical cores; flags: {' '.join(f for f in FLAGS if f in flags) or 'none of ' + ','.join(FLAGS)}"


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

    async def client(http: httpx.AsyncClient, k: int) -> None:
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

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, k) for k in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    done = len(latencies)
    return {"requests": done, "texts_s": (done - errors) * size / wall, "req_s": done / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(done - 1, int(0.99 * done))], "errors": errors}


def run_suite(name: str, url: str, path: str, model: str, args: argparse.Namespace, pool: list[str],
              headers: dict[str, str]) -> dict[tuple[int, int], dict[str, float]]:
    """Each (size, clients) load ``args.rounds`` times, the client counts interleaved within a round so
    that the machine's other load falls on all of them alike; the median round is reported."""
    asyncio.run(load(url, path, model, pool, 4, 16, 40, 30, headers))  # warm-up
    results = {}
    for size in args.sizes:
        rounds: dict[int, list[dict[str, float]]] = {c: [] for c in args.clients}
        for _ in range(args.rounds):
            for clients in args.clients:
                rounds[clients].append(asyncio.run(load(url, path, model, pool, clients, size, args.requests,
                                                        args.seconds, headers)))
        for clients, runs in rounds.items():
            runs.sort(key=lambda r: r["texts_s"])
            r = dict(runs[len(runs) // 2])
            r["errors"] = sum(x["errors"] for x in runs)
            r["requests"] = sum(x["requests"] for x in runs)
            results[(size, clients)] = r
            each = ", ".join(f"{x['texts_s']:.0f}" for x in runs)
            print(f"{name:9s} {size:3d} texts/req {clients:3d} clients: {r['texts_s']:8.1f} texts/s "
                  f"{r['req_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                  f"errors {r['errors']} of {r['requests']} (median of {len(runs)} rounds: {each} texts/s)",
                  flush=True)
    for size in args.sizes:
        if (size, 1) in results and (size, 32) in results:
            print(f"{name}: {size} texts/req: 32 clients / 1 at a time = "
                  f"{results[(size, 32)]['texts_s'] / results[(size, 1)]['texts_s']:.2f}x", flush=True)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infinity(python: str, args: argparse.Namespace, pool: list[str]) -> dict | None:
    import httpx
    from embedkit_text import minilm_folder

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(ROOT / ".bench" / "infinity-serve.log", "w")
    proc = subprocess.Popen([python, "-m", "infinity_emb.cli", "v2", "--model-id", str(minilm_folder()),
                             "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--engine", "torch",
                             "--no-bettertransformer"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                print(f"infinity-emb exited {proc.returncode}; see .bench/infinity-serve.log")
                return None
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            print("infinity-emb was not ready within 300 s")
            return None
        model = httpx.get(url + "/models").json()["data"][0]["id"]
        return run_suite("infinity", url, "/embeddings", model, args, pool, {})
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss(server, counts: list[int], pool: list[str]) -> None:
    import httpx
    import psutil

    process = psutil.Process(server.proc.pid)
    done = 0
    with httpx.Client(timeout=30) as http:
        for target in counts:
            start, before = time.monotonic(), done
            while done < target:
                r = http.post(server.url + "/v1/embeddings", json={"input": pool[done % len(pool)]})
                assert r.status_code == 200, r.text
                done += 1
            print(f"server RSS after {done:7d} small requests: {process.memory_info().rss / 2**20:7.1f} MiB "
                  f"({done - before} requests in {time.monotonic() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--sizes", default="1,16")
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration at most")
    parser.add_argument("--seconds", type=float, default=30, help="seconds per configuration at most")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--max-batch-tokens", default="2048")
    parser.add_argument("--max-wait-ms", default="2")
    parser.add_argument("--infinity", help="python of a venv with infinity-emb (e.g. .bench/infinity/bin/python)")
    parser.add_argument("--rss", default="", help="e.g. 1000,100000: RSS after that many small requests")
    args = parser.parse_args()
    args.clients = [int(x) for x in args.clients.split(",")]
    args.sizes = [int(x) for x in args.sizes.split(",")]

    from serving import Server

    pool = texts()
    print(f"CPU: {cpu()}")
    print(f"Banking77 test: {len(pool)} texts; backbone {args.backbone}; max-batch-tokens {args.max_batch_tokens}, "
          f"max-wait-ms {args.max_wait_ms}; client and server share this machine", flush=True)
    with Server("--backbone", args.backbone, "--max-batch-tokens", args.max_batch_tokens,
                "--max-wait-ms", args.max_wait_ms, grace=60) as server:
        run_suite("embedkit", server.url, "/v1/embeddings", args.backbone, args, pool, {})
        if args.rss:
            rss(server, [int(x) for x in args.rss.split(",")], pool)
    if args.infinity:
        infinity(args.infinity, args, pool)


if __name__ == "__main__":
    main()
