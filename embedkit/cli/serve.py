"""The ``serve`` command: the HTTP embedding service (see :mod:`embedkit.serve.app`)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..serve.addresses import check_allowed_host, check_allowed_origin, check_port
from ..serve.settings import SERVE_MAX_INFLIGHT_IMAGE_BYTES, SERVE_MAX_PIXELS
from .common import existing_file, non_negative_float, non_negative_int, positive_float, positive_int, store_arg

DEFAULT_BACKBONE = "minilm-l6"
MAX_HEADER_BYTES = 65536
SEND_TIMEOUT = 60.0


def _checked(check: Any) -> Any:
    """An argparse type from a check that raises ValueError saying the expected form."""
    def parse(value: str) -> Any:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve embeddings and saved models over HTTP (OpenAI-compatible /v1/embeddings)",
                       description="Serve embeddings and saved models over HTTP. Exit codes: 0 drained and "
                       "stopped, 1 a model cannot be loaded or a bad option, 3 the address cannot be bound "
                       "(port in use).")
    p.add_argument("--backbone", action="append", default=[],
                   help="backbone name, artifact folder or digest to serve, optionally NAME=SPEC (repeatable; "
                   f"default {DEFAULT_BACKBONE} when no --model is given). A request without 'model' gets the "
                   "first one served of its kind and modality")
    p.add_argument("--model", action="append", default=[],
                   help="saved model folder (the model/ that train-head --out writes) served by /predict, "
                   "optionally NAME=PATH (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_checked(check_port), default=8000,
                   help="TCP port (default 8000; 0: any free port, the one bound is printed)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (visible in ps: prefer --api-key-file "
                     "or EMBEDKIT_API_KEY)")
    key.add_argument("--api-key-file", type=existing_file, help="file holding the API key (first line)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME", type=_checked(check_allowed_host),
                   help="without an API key, a Host header this server answers besides 127.0.0.1, localhost, "
                   "::1 and the --host address (repeatable; '*': any; default none: a guard against DNS rebinding)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   type=_checked(check_allowed_origin),
                   help="a browser Origin (scheme://host[:port]) allowed besides pages on an allowed host "
                   "(repeatable; '*': any; default none)")
    p.add_argument("--max-batch-tokens", type=positive_int,
                   help="padded tokens per text batch (default: the encoder's, 384 on CPU, 16384 on CUDA)")
    p.add_argument("--max-batch-images", type=positive_int, default=16, help="images per image batch (default 16)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=2.0,
                   help="longest wait for a batch to fill, in ms (default 2)")
    p.add_argument("--max-queue", type=positive_int, default=4096,
                   help="queued items per model before 429 (default 4096)")
    p.add_argument("--max-body-bytes", type=positive_int, default=16 * 2**20,
                   help="request body limit, 413 beyond (default 16777216: 16 MiB)")
    p.add_argument("--max-inflight-bytes", type=positive_int, default=64 * 2**20,
                   help="body bytes of all requests in flight together, 429 with Retry-After beyond "
                   "(default 67108864: 64 MiB)")
    p.add_argument("--max-inflight-image-bytes", type=positive_int, default=SERVE_MAX_INFLIGHT_IMAGE_BYTES,
                   help="decoded image bytes (3 x H x W float32 model inputs: 602112 bytes a 224 x 224 image) of all "
                   "requests in flight together, from before decoding to the answer; 429 image_budget_full with "
                   "Retry-After beyond, 413 too_many_image_bytes for one request over it (default "
                   f"{SERVE_MAX_INFLIGHT_IMAGE_BYTES}: {SERVE_MAX_INFLIGHT_IMAGE_BYTES // 2**20} MiB, 891 images of "
                   "224 x 224)")
    p.add_argument("--max-items", type=positive_int, default=2048, help="items per request, 413 beyond (default 2048)")
    p.add_argument("--max-chars", type=positive_int, default=100_000,
                   help="characters per text, 413 beyond (default 100000)")
    p.add_argument("--max-pixels", type=positive_int, default=SERVE_MAX_PIXELS,
                   help=f"pixels per image; larger ones fail as too_large (default {SERVE_MAX_PIXELS}: 4096 x 4096)")
    p.add_argument("--long", choices=["truncate", "chunk", "error"], default="truncate",
                   help="served backbones: a text over the backbone's max length is truncated there (default "
                   "truncate), chunked (windows of max length, each embedded, pooled as their mean weighted by "
                   "tokens; the batching queue counts windows) or an error (too_long). A saved --model keeps the "
                   "policy it was saved with")
    p.add_argument("--chunk-overlap", type=non_negative_int,
                   help="--long chunk: tokens shared by neighbouring windows (default 32; under half a window)")
    p.add_argument("--max-chunks", type=positive_int,
                   help="--long chunk: windows per text at most; a longer text is embedded from its first ones "
                   "(default 64)")
    p.add_argument("--calibration", action="append", default=[], type=existing_file, metavar="FILE",
                   help="int8 / uint8 ranges for /v1/embeddings encoding_format int8 | uint8: a JSON record as "
                   "`embedkit store calibration` writes it (used for the backbone whose digest it names) or a "
                   "bare Calibration.to_dict() record (used for the backbone its source names, else for any "
                   "served text backbone of its dimension count, with a warning); its sha256 is required and "
                   "its long-text policy must be --long's; repeatable. Without one, those formats answer 422 "
                   "calibration_required")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime threads per model (default: all cores)")
    p.add_argument("--streams", type=positive_int, help="concurrent ONNX Runtime sessions (batch workers) per model "
                   "(default: the runtime's choice)")
    p.add_argument("--drain-seconds", type=non_negative_float, default=30.0,
                   help="on SIGTERM, time for requests in flight to finish; then they get 503 shutting_down, "
                   "queued items are dropped and the process exits (default 30)")
    p.add_argument("--header-timeout", type=positive_float, default=10.0,
                   help="seconds a client has to send a request's line and headers (default 10)")
    p.add_argument("--body-timeout", type=positive_float, default=60.0,
                   help="seconds a client has to send a request's body after its headers (default 60)")
    p.add_argument("--keep-alive", type=positive_float, default=5.0,
                   help="seconds an idle keep-alive connection is held (default 5)")
    p.add_argument("--max-connections", type=positive_int, default=1000,
                   help="open connections (and requests) allowed at once; a request on one more gets 503 "
                   "(default 1000)")
    p.add_argument("--max-header-bytes", type=positive_int, default=MAX_HEADER_BYTES,
                   help="bytes of a request's line and headers at most; beyond, 431 headers_too_large and the "
                   f"connection is closed (default {MAX_HEADER_BYTES}: 64 KiB)")
    p.add_argument("--send-timeout", type=positive_float, default=SEND_TIMEOUT,
                   help="seconds a client may take none of its response while some waits to be sent; then the "
                   "connection is aborted (default 60)")
    store_arg(p)


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file (its first line; a UTF-8 BOM is not part of it), --api-key or
    EMBEDKIT_API_KEY, or None. One that is given but empty is refused (it would turn the key off),
    as is one a client cannot send (whitespace, control or other unprintable characters)."""
    if args.api_key_file:
        where = f"--api-key-file {args.api_key_file}"
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {where}: {exc}") from None
        key: str | None = lines[0].strip() if lines else ""
    else:
        where = "--api-key" if args.api_key is not None else "EMBEDKIT_API_KEY"
        key = args.api_key if args.api_key is not None else os.environ.get("EMBEDKIT_API_KEY")
        if key is not None and key != key.strip():  # a client could never send it: 'Bearer KEY' is read stripped
            raise UsageError(f"{where} has leading or trailing whitespace; remove it")
    if key is None:
        return None
    if not key:
        raise UsageError(f"the API key is empty ({where}): it would turn authentication off; give a key, "
                         "or unset it to serve without one")
    if any(c.isspace() for c in key):
        raise UsageError("the API key contains whitespace; a client cannot send it in 'Authorization: Bearer KEY'")
    if not key.isprintable() or not key.isascii():
        raise UsageError(f"the API key ({where}) holds a control or non-ASCII character; a client cannot send "
                         "it in 'Authorization: Bearer KEY'")
    return key


def _calibrations(files: list[str], policy: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """``(artifact digest or its prefix, or None, Calibration)`` of each ``--calibration`` file: the
    digest its record names (a file of `store calibration`), else the one its ``source`` names
    (``store:NAME/DIGEST12...``), else None (offered to every text backbone of its dimension count,
    with a warning). UsageError when one is not a verifiable calibration record (altered, or its
    sha256 missing); CalibrationMismatchError when it was fitted under another long-text policy
    than the server's ``policy`` (:func:`embedkit.encoders.calibrations.policy_of`)."""
    from ..encoders.calibrations import check_policy, read_file, warn_unnamed

    out: list[tuple[str | None, Any]] = []
    for name in files:
        cal, fitted = read_file(name)
        check_policy(fitted, policy, what=f"--calibration {name}")
        if not fitted.named:
            warn_unnamed(fitted, "any served text backbone", what=f"--calibration {name}")
        out.append((fitted.digest, cal))
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("uvicorn", "serve", "embedkit serve") from None
    from ..encoders.calibrations import policy_of
    from ..serve.app import Limits, Settings, create_app
    from ..serve.connections import bounded_protocol
    from ..serve.server import FLUSH_SECONDS, Server

    if args.long != "chunk" and (args.chunk_overlap is not None or args.max_chunks is not None):
        raise UsageError("--chunk-overlap and --max-chunks apply with --long chunk")

    limits = Limits(max_body_bytes=args.max_body_bytes, max_items=args.max_items, max_chars=args.max_chars,
                    max_pixels=args.max_pixels, max_inflight_bytes=max(args.max_inflight_bytes, args.max_body_bytes),
                    max_inflight_image_bytes=args.max_inflight_image_bytes)
    settings = Settings(
        backbones=args.backbone or ([] if args.model else [DEFAULT_BACKBONE]), models=args.model, store=args.store,
        api_key=_api_key(args), limits=limits, max_batch_tokens=args.max_batch_tokens,
        max_batch_images=args.max_batch_images, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        threads=args.threads, streams=args.streams, host=args.host, allowed_hosts=args.allowed_host,
        allowed_origins=args.allowed_origin, long=args.long, chunk_overlap=args.chunk_overlap,
        max_chunks=args.max_chunks,
        calibrations=_calibrations(args.calibration, policy_of(args.long, args.chunk_overlap, args.max_chunks)),
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
                            timeout_graceful_shutdown=args.drain_seconds + FLUSH_SECONDS, lifespan="on",
                            http=bounded_protocol(args.header_timeout, args.body_timeout, args.max_header_bytes,
                                                  args.send_timeout),
                            # uvicorn refuses when len(connections) >= limit, the new one counted: +1
                            # allows --max-connections open at once
                            timeout_keep_alive=args.keep_alive, limit_concurrency=args.max_connections + 1)
    service = app.service

    def drain() -> None:  # the first SIGTERM / SIGINT: queued and unqueued requests meet one deadline
        service.begin_drain(args.drain_seconds)
        asyncio.get_running_loop().call_later(args.drain_seconds, app.inflight.abort)

    def force() -> None:  # a second Ctrl-C: the deadline now
        service.abort()
        app.inflight.abort()

    server = Server(config, on_drain=drain, on_force=force, failed=lambda: bool(failed or service.failed),
                    settled=lambda: bool(service.ready or service.failed))
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was there
    # before it: a no-op here, so a drained shutdown exits 0 instead of dying by the signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit as exc:
        if server.started:
            raise
        # uvicorn could not bind (port in use: exit 3) while a model may still be loading in a
        # native thread; finalising the interpreter under that thread can abort (SIGABRT, seen on a
        # loaded machine), so the documented exit code is given at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    finally:
        # Once drained, a second SIGTERM (a supervisor's repeat) must not turn the clean exit into
        # death by signal while the interpreter winds down: the no-op handlers stay.
        if not server._captured_signals:
            for s, handler in previous.items():
                signal.signal(s, handler)
    code = 1 if failed or service.failed or not server.started else 0
    if code:
        print(f"embedkit serve: not serving: {service.failed or 'the server did not start'}", file=sys.stderr,
              flush=True)
    if not service.ready and not service.failed:
        # Stopped while the models load in a native thread (an export, an ONNX Runtime session):
        # finalising the interpreter under it aborts (SIGABRT, exit 134). The model store is
        # crash-safe (a half export is a staging folder, swept by the next export), so end here.
        print("embedkit serve: stopped while the models were still loading", file=sys.stderr, flush=True)
    # Served and drained: end here too. Finalising the interpreter resets the signal handlers to
    # their defaults, so a supervisor's repeated SIGTERM during a slow wind-down (native runtime
    # threads, a loaded machine) turned a clean drain into death by signal (-15); and nothing is
    # left to write (every answer was sent, the model store commits atomically).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


COMMANDS = {"serve": cmd_serve}
