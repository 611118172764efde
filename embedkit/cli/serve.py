"""The ``serve`` command: the HTTP embedding service (see :mod:`embedkit.serve.app`)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import existing_file, non_negative_float, non_negative_int, positive_int, store_arg

DEFAULT_BACKBONE = "minilm-l6"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve embeddings and saved models over HTTP (OpenAI-compatible /v1/embeddings)")
    p.add_argument("--backbone", action="append", default=[],
                   help="backbone name, artifact folder or digest to serve, optionally NAME=SPEC (repeatable; "
                   f"default {DEFAULT_BACKBONE} when no --model is given)")
    p.add_argument("--model", action="append", default=[],
                   help="saved model folder (the model/ that train-head --out writes) served by /predict, "
                   "optionally NAME=PATH (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="TCP port (default 8000; 0: any free port)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (visible in ps: prefer --api-key-file "
                     "or EMBEDKIT_API_KEY)")
    key.add_argument("--api-key-file", type=existing_file, help="file holding the API key (first line)")
    p.add_argument("--max-batch-tokens", type=positive_int,
                   help="padded tokens per text batch (default: the encoder's, 384 on CPU, 16384 on CUDA)")
    p.add_argument("--max-batch-images", type=positive_int, default=16, help="images per image batch")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=2.0, help="longest wait for a batch to fill")
    p.add_argument("--max-queue", type=positive_int, default=4096, help="queued items per model before 429")
    p.add_argument("--max-body-bytes", type=positive_int, default=16 * 2**20, help="request body limit (413)")
    p.add_argument("--max-items", type=positive_int, default=2048, help="items per request (413)")
    p.add_argument("--max-chars", type=positive_int, default=100_000, help="characters per text (413)")
    p.add_argument("--max-pixels", type=positive_int, help="pixels per image (default: the library's); larger fail as too_large")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime threads per model (default: all cores)")
    p.add_argument("--streams", type=positive_int, help="concurrent ONNX Runtime sessions (batch workers) per model "
                   "(default: the runtime's choice)")
    p.add_argument("--drain-seconds", type=non_negative_float, default=30.0, help="on SIGTERM, wait this long for requests in flight")
    store_arg(p)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --api-key-file {args.api_key_file}: {exc}") from None
        key = lines[0].strip() if lines else ""
    else:
        key = args.api_key or os.environ.get("EMBEDKIT_API_KEY") or ""
    if (args.api_key_file or args.api_key) and not key:
        raise UsageError("the API key is empty")
    return key or None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("uvicorn", "serve", "embedkit serve") from None
    from ..inputs.image import DEFAULT_MAX_PIXELS
    from ..serve.app import Limits, Settings, create_app

    limits = Limits(max_body_bytes=args.max_body_bytes, max_items=args.max_items, max_chars=args.max_chars,
                    max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    settings = Settings(
        backbones=args.backbone or ([] if args.model else [DEFAULT_BACKBONE]), models=args.model, store=args.store,
        api_key=_api_key(args), limits=limits, max_batch_tokens=args.max_batch_tokens,
        max_batch_images=args.max_batch_images, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        threads=args.threads, streams=args.streams,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use it "
              "(set EMBEDKIT_API_KEY or --api-key-file)", file=sys.stderr)
    failed: list[bool] = []
    server: Any = None

    def fatal() -> None:
        failed.append(True)
        server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=args.drain_seconds, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was there
    # before it: a no-op here, so a drained shutdown exits 0 instead of dying by the signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"embedkit serve: http://{args.host}:{args.port} (SIGTERM or Ctrl-C drains and stops)", file=sys.stderr)
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 1 if failed or not server.started else 0


COMMANDS = {"serve": cmd_serve}
