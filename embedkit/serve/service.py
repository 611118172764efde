"""The service behind ``embedkit serve``'s routes: the served models and what each request does.

:class:`Service` holds the served backbones and saved models (loaded once, from the command
line) and one :class:`~embedkit.serve.batching.Batcher` per artifact. The encoders' own tokenizer and
image processor apply the library's input policy, so a response equals :func:`embedkit.embed` for
the same items within float32 rounding (docs/serve.md, Parity; rows of failed items are ``null``,
each with an error record). The options are
:mod:`embedkit.serve.settings`, the typed error :mod:`embedkit.serve.api_error`, the request bodies
:mod:`embedkit.serve.bodies` and OpenAI's route :mod:`embedkit.serve.openai_api`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..encoder import encoder_for
from ..heads.persistence import load
from ..inputs.items import ItemError, ItemFailure
from ..inputs.windows import to_items
from ..models.resolve import resolve
from ..models.store import Artifact
from ..runtimes.cpu import cpu_count
from . import bodies, openai_api
from .api_error import ApiError
from .batching import Batcher, Job, QueueFullError
from .image_budget import ImageBudget
from .metrics import Metrics
from .settings import Settings

logger = logging.getLogger(__name__)

OFFLOAD_CELLS = 32_768  # responses with more floats than this are serialised in a thread
IMAGE_DECODERS = 4  # images decoded at once, at most
INLINE_CHARS = 2048  # texts up to this many characters in all are tokenised on the event loop (< ~0.2 ms)


@dataclass
class Served:
    """One name a request may ask for: a backbone, or a saved model (backbone + head)."""

    name: str
    kind: str  # "backbone" | "model"
    artifact: Any
    batcher: Batcher
    encoder: Any  # TextEncoder (its tokenizer) or ImageEncoder (its processor): the input policy
    head: Any = None
    compact: Any = None  # a saved model whose Embedder makes compact rows: its head was trained on those


def _native(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class Service:
    """The served models and the request logic behind each route."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = settings.limits
        self.metrics = Metrics()
        self.served: dict[str, Served] = {}
        self.batchers: dict[str, Batcher] = {}  # by artifact digest: one queue per runtime
        self.ready = False
        self.failed: str | None = None
        self.draining = False
        self._jobs: set[Job] = set()  # jobs awaited by requests now: failed with 503 at the drain deadline
        self.image_budget = ImageBudget(self.limits.max_inflight_image_bytes)  # decoded images, all requests
        self._decoders = ThreadPoolExecutor(cpu_count(), thread_name_prefix="embedkit-serve-decode")
        # Images decode on a pool of their own: a request of large photos cannot hold the threads that
        # parse and tokenise other requests, and at most IMAGE_DECODERS images are in memory at once
        # (~19 bytes a pixel while decoded and resized: ~0.3 GB each at the default --max-pixels).
        self._image_decoders = ThreadPoolExecutor(min(cpu_count(), IMAGE_DECODERS),
                                                  thread_name_prefix="embedkit-serve-image")

    # -- loading ---------------------------------------------------------------------------
    def start(self, on_fatal: Callable[[], None] | None = None) -> None:
        """Load the models in a thread; ``/ready`` answers 503 until they are loaded."""
        def load() -> None:
            try:
                if self.settings.backbones or self.settings.models:
                    logger.warning("loading %s (a backbone's first use exports it: tens of seconds; /ready "
                                   "answers 503 until then)", ", ".join(self.settings.backbones + self.settings.models))
                for spec in self.settings.backbones:
                    self._add_backbone(spec)
                for spec in self.settings.models:
                    self._add_model(spec)
                self.ready = True
                logger.warning("ready: %s", ", ".join(self.served))
            except Exception as exc:
                self.failed = f"{type(exc).__name__}: {exc}"
                logger.error("cannot serve: %s", self.failed)
                if on_fatal is not None:
                    on_fatal()

        threading.Thread(target=load, name="embedkit-serve-load", daemon=True).start()

    def _encoder(self, artifact: Any, **policy: Any) -> Any:

        options: dict[str, Any] = {"threads": self.settings.threads, "streams": self.settings.streams}
        if artifact.modality == "image":
            options.update(max_pixels=self.limits.max_pixels, reject_blank=policy.get("reject_blank"))
        else:  # a saved Embedder's chunk options are its defaults unless long="chunk": they apply then only
            keys = ("truncate", "empty", "long") + (("chunk_overlap", "max_chunks") if policy.get("long") == "chunk" else ())
            options.update({k: policy.get(k) for k in keys})
        return encoder_for(artifact, **options)

    def _batcher(self, artifact: Any, encoder: Any) -> Batcher:
        if artifact.digest not in self.batchers:
            name = artifact.name
            self.batchers[artifact.digest] = Batcher(
                encoder.runtime, artifact.dim, artifact.modality,
                max_tokens=self.settings.max_batch_tokens or getattr(encoder, "batch_tokens", 16384),
                max_images=self.settings.max_batch_images, max_wait=self.settings.max_wait_ms / 1000.0,
                max_queue=self.settings.max_queue, name=name,
                on_batch=lambda n, s: self.metrics.batch(name, n, s),
            )
        return self.batchers[artifact.digest]

    def _add(self, served: Served) -> None:
        if served.name in self.served:
            raise ValueError(f"two served models are named {served.name!r}; name one NAME=PATH")
        self.served[served.name] = served

    def _add_backbone(self, spec: str) -> None:

        name, _, ref = spec.rpartition("=") if "=" in spec else ("", "", spec)
        artifact = resolve(ref, self.settings.store)
        encoder = self._encoder(artifact, long=self.settings.long, chunk_overlap=self.settings.chunk_overlap,
                                max_chunks=self.settings.max_chunks)
        self._add(Served(name or artifact.name, "backbone", artifact, self._batcher(artifact, encoder), encoder))

    def _add_model(self, spec: str) -> None:

        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        pipeline = load(path, store=self.settings.store)
        embedder, head = pipeline.steps[0][1], pipeline.steps[1][1]
        artifact = Artifact.open(embedder.artifact_path_)
        encoder = self._encoder(artifact, **embedder.get_params())
        self._add(Served(name or Path(path).resolve().name, "model", artifact, self._batcher(artifact, encoder),
                         encoder, head, getattr(embedder, "compact_", None)))

    def begin_drain(self, seconds: float) -> None:
        """The server stopped accepting (SIGTERM): what is in flight has ``seconds`` to finish, then
        :meth:`abort` answers it 503 (called on the event loop)."""
        self.draining = True
        asyncio.get_running_loop().call_later(seconds, self.abort)

    def abort(self) -> None:
        """The drain deadline: every request still waiting gets 503 ``shutting_down`` and the
        queued items are dropped (a batch already running finishes; its rows are discarded)."""
        dropped = sum(batcher.abort() for batcher in self.batchers.values())
        pending = [job for job in self._jobs if not job.future.done()]
        for job in pending:
            job.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down: the drain "
                                              "deadline (--drain-seconds) passed before this request finished"))
        if pending or dropped:
            logger.warning("drain deadline: %d request(s) answered 503, %d queued item(s) dropped",
                           len(pending), dropped)

    def close(self) -> None:
        """Stop the workers (called once the server stopped accepting and the requests in flight are
        answered: what is still queued then belongs to no request). Waits at most a few seconds for
        a running batch: the worker threads are daemons."""
        for batcher in self.batchers.values():
            batcher.abort()
        for batcher in self.batchers.values():
            batcher.close(timeout=2.0)
        self._decoders.shutdown(wait=False, cancel_futures=True)
        self._image_decoders.shutdown(wait=False, cancel_futures=True)

    # -- lookups ---------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.failed:
            raise ApiError(503, "not_ready", "the server could not load its models (see its log)")
        if not self.ready:
            raise ApiError(503, "not_ready", "the models are still loading; retry shortly", headers={"Retry-After": "1"})

    def names(self) -> list[str]:
        return list(self.served)

    def describe(self) -> list[dict[str, Any]]:
        return [{"id": s.name, "object": "model", "created": 0, "owned_by": "embedkit", "kind": s.kind,
                 "modality": s.artifact.modality, "dim": s.artifact.dim, "digest": s.artifact.digest}
                for s in self.served.values()]

    def depths(self) -> dict[str, int]:
        return {b.name: b.depth for b in self.batchers.values()}

    def lookup(self, name: Any, kind: str, modality: str | None = None) -> Served:
        self.require_ready()
        if name is None:
            for served in self.served.values():
                if served.kind == kind and modality in (None, served.artifact.modality):
                    return served
            raise ApiError(404, "model_not_found", f"no {modality or ''} {kind} is served here".replace("  ", " "))
        if not isinstance(name, str):
            raise ApiError(422, "invalid_type", f"model must be a string, got {type(name).__name__}")
        served = self.served.get(name)
        if served is None or served.kind != kind:
            names = ", ".join(n for n, s in self.served.items() if s.kind == kind) or "none"
            raise ApiError(404, "model_not_found", f"no {kind} of that name is served; served: {names}")
        if modality is not None and served.artifact.modality != modality:
            article = "an" if served.artifact.modality[0] in "aeiou" else "a"
            raise ApiError(422, "wrong_modality", f"{name} is {article} {served.artifact.modality} model; "
                           f"this request sent {modality} items")
        return served

    # -- request bodies ----------------------------------------------------------------------
    async def json_body(self, request: Any) -> dict[str, Any]:
        return await bodies.json_body(request, self._decoders, self.limits)

    async def payload(self, request: Any) -> dict[str, Any]:
        """A JSON body, or a multipart form of ``images`` files (and an optional ``model`` field)."""
        return await bodies.payload(request, self.limits, self._decoders)

    # -- embedding ---------------------------------------------------------------------------
    async def _wait(self, served: Served, job: Job, request: Any) -> tuple[np.ndarray, list[ItemError]]:
        """The job's result, or its queued items dropped when the client disconnects first."""
        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(gone())
        self._jobs.add(job)
        try:
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            self._jobs.discard(job)
        if not job.future.done():
            dropped = served.batcher.cancel(job)
            self.metrics.dropped.labels(served.batcher.name).inc(dropped)
            job.future.cancel()
            raise ApiError(499, "client_closed_request", "the client closed the connection")
        return job.future.result()

    async def _run(self, served: Served, job: Job, rows: Any, data: list[Any], request: Any,
                   finish: Callable[..., tuple[np.ndarray, list[ItemError]]] | None = None,
                   ) -> tuple[np.ndarray, list[ItemError]]:
        bodies.check_queue(len(data), served.batcher.max_queue, "windows" if finish is not None else "items")
        try:
            served.batcher.submit(job, rows, data)
        except QueueFullError as exc:
            raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": str(exc.retry_after)}) from exc
        except RuntimeError as exc:
            raise ApiError(503, "shutting_down", "the server is shutting down") from exc
        vectors, errors = await self._wait(served, job, request)
        if finish is not None:  # windows pooled into texts (long="chunk")
            vectors, errors = finish(vectors, errors)
        for error in errors:
            self.metrics.item_errors.labels(error.code).inc()
        self.metrics.embedded.labels(served.batcher.name).inc(len(vectors) - len(errors))
        return vectors, errors

    def _job(self, n: int, dim: int) -> Job:
        loop = asyncio.get_running_loop()
        return Job(n, dim, loop, loop.create_future())

    async def texts(self, served: Served, texts: list[Any], request: Any) -> tuple[np.ndarray, list[ItemError], int]:
        """(vectors (n, dim) float32, NaN rows where failed; errors; tokens) for ``texts``."""
        tokenizer = served.encoder.tokenizer
        if sum(len(t) for t in texts if isinstance(t, str)) <= INLINE_CHARS:  # cheaper than a thread hop
            tokens = tokenizer.encode(texts)
        else:
            tokens = await asyncio.get_running_loop().run_in_executor(self._decoders, tokenizer.encode, texts)
        if tokens.windows is None:
            job = self._job(len(texts), served.artifact.dim)
            job.errors = list(tokens.errors)
            vectors, errors = await self._run(served, job, tokens.indices, tokens.ids, request)
            return vectors, errors, tokens.stats.tokens

        def pooled(rows: np.ndarray, _: list[ItemError]) -> tuple[np.ndarray, list[ItemError]]:
            vectors, _ok, bad = to_items(rows, tokens.indices, [len(x) for x in tokens.ids],
                                         served.artifact.preprocess.normalize, len(texts))
            bad_rows = [ItemError(int(i), "non_finite", "model", "the model output NaN or inf") for i in bad]
            return vectors, sorted(tokens.errors + bad_rows, key=lambda e: e.index)

        job = self._job(len(tokens.ids), served.artifact.dim)  # one row per window
        vectors, errors = await self._run(served, job, range(len(tokens.ids)), tokens.ids, request, finish=pooled)
        return vectors, errors, tokens.stats.tokens

    async def images(self, served: Served, payloads: list[Any], request: Any) -> tuple[np.ndarray, list[ItemError]]:
        """(vectors, errors) for images given as bytes (multipart) or base64 strings (JSON)."""
        loop = asyncio.get_running_loop()
        processor = served.encoder.processor

        def decode(index: int, payload: Any) -> tuple[np.ndarray | None, ItemError | None]:
            payload, error = bodies.image_bytes(index, payload)
            if error is not None:
                return None, error
            try:
                return processor(payload)[0], None
            except ItemFailure as failure:
                return None, failure.record(index)
            except Exception as exc:  # an unforeseen decoder error costs its item only
                return None, ItemError(index, "decode_failed", "decode", type(exc).__name__)

        # Their decoded bytes are held from before decoding until the answer (413 / 429 when they do not fit).
        with self.image_budget.hold(len(payloads), processor.preprocess.crop, served.batcher):
            decoded = await asyncio.gather(*(loop.run_in_executor(self._image_decoders, decode, i, p)
                                             for i, p in enumerate(payloads)))
            job = self._job(len(payloads), served.artifact.dim)
            job.errors = [e for _, e in decoded if e is not None]
            rows = [i for i, (x, _) in enumerate(decoded) if x is not None]
            return await self._run(served, job, rows, [decoded[i][0] for i in rows], request)

    async def _inputs(self, served_kind: str, body: dict[str, Any], text_key: str,
                      request: Any) -> tuple[Served, np.ndarray, list[ItemError], dict[str, int]]:
        has_texts, has_images = text_key in body, "images" in body
        if has_texts == has_images:
            raise ApiError(422, "invalid_request", f"send exactly one of '{text_key}' or 'images'")
        if has_texts:
            served = self.lookup(body.get("model"), served_kind, "text")
            texts = bodies.items(body, text_key, self.limits)
            bodies.check_chars(texts, text_key, self.limits)
            vectors, errors, tokens = await self.texts(served, texts, request)
            return served, vectors, errors, {"prompt_tokens": tokens, "total_tokens": tokens}
        served = self.lookup(body.get("model"), served_kind, "image")
        images = bodies.items(body, "images", self.limits)
        vectors, errors = await self.images(served, images, request)
        return served, vectors, errors, {"images": len(images)}

    async def _json(self, build: Callable[[], dict[str, Any]], cells: int) -> bytes:
        """The JSON body from ``build()``; with over OFFLOAD_CELLS floats it is built and serialised in a
        thread, so that one large response does not stall every other request on the event loop."""
        def work() -> bytes:
            return json.dumps(build(), separators=(",", ":")).encode()

        if cells <= OFFLOAD_CELLS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._decoders, work)

    async def embed(self, body: dict[str, Any], request: Any) -> bytes:
        """``POST /embed``: rows ``null`` where an item failed, ``ok`` and ``errors`` as embedkit.embed."""
        served, vectors, errors, usage = await self._inputs("backbone", body, "texts", request)
        failed = {e.index for e in errors}
        return await self._json(lambda: {
            "object": "list", "model": served.name, "dim": served.artifact.dim,
            "data": [None if i in failed else row.tolist() for i, row in enumerate(vectors)],
            "ok": [i not in failed for i in range(len(vectors))],
            "errors": [e.to_json() for e in errors], "usage": usage}, vectors.size)

    async def predict(self, body: dict[str, Any], request: Any) -> bytes:
        """``POST /predict``: a saved model's label (and class probabilities) per item."""
        bodies.refuse_predict_dimensions(body)
        served, vectors, errors, usage = await self._inputs("model", body, "inputs", request)
        failed = {e.index for e in errors}
        good = [i for i in range(len(vectors)) if i not in failed]
        head = served.head

        def run() -> tuple[Any, Any]:
            X = vectors[good] if served.compact is None else served.compact.apply(vectors[good])
            proba = None
            if hasattr(head, "predict_proba"):
                try:
                    proba = head.predict_proba(X)
                except AttributeError:  # e.g. an SVC without probability=True
                    proba = None
            return head.predict(X), proba

        labels, proba = await asyncio.get_running_loop().run_in_executor(self._decoders, run) if good else ([], None)
        classes = [_native(c) for c in getattr(head, "classes_", [])]
        predictions: list[Any] = [None] * len(vectors)
        for k, i in enumerate(good):
            entry: dict[str, Any] = {"label": _native(labels[k])}
            if proba is not None:
                entry["probabilities"] = {str(c): float(p) for c, p in zip(classes, proba[k])}
            predictions[i] = entry
        return await self._json(lambda: {
            "object": "list", "model": served.name, "predictions": predictions,
            "ok": [i not in failed for i in range(len(vectors))],
            "errors": [e.to_json() for e in errors], "usage": usage}, len(predictions) * len(classes))

    async def openai_embeddings(self, body: dict[str, Any], request: Any) -> bytes:
        """``POST /v1/embeddings``: OpenAI's request and response."""
        served = self.lookup(body.get("model"), "backbone")
        texts, fmt = openai_api.check_request(body, served, self.limits, self.settings.calibrations)
        vectors, errors, tokens = await self.texts(served, texts, request)
        if errors:
            shown = "; ".join(f"input[{e.index}]: {e.code}" for e in errors[:5])
            raise ApiError(422, "invalid_input", f"{len(errors)} input(s) cannot be embedded: {shown}")
        return await self._json(lambda: openai_api.response(served.name, vectors, tokens, fmt), vectors.size)
