"""HTTP face: `mmtag serve RUN` (FastAPI + uvicorn). Every answer comes from the fitted `Tagger`.

    GET  /               a web page: pick an image, type a caption, see labels and scores
    GET  /health         liveness and what the model needs
    GET  /labels         label ids and names
    POST /predict        multipart: image file + caption → labels, scores, thresholds
    POST /predict/batch  multipart: images[] + captions[] → one result per item
    GET  /docs           OpenAPI documentation (FastAPI's own)

A late-fusion model (one with `branches`, see `Tagger.branches`) also answers an item that has
only an image or only a caption, from that branch alone; every result says what it read
(`modalities_used`) and, when one branch answered, why (`note`), and gives the thresholds that
decided it. An early-fusion model refuses such an item (422, naming the missing field).

Every error is JSON `{"error": ...}`, never a 500: bodies over the upload limit (413, also when
chunked), uploads that do not decode as an image (415), images over the dimension cap, missing or
empty fields (422), unknown paths (404), wrong methods (405), malformed HTTP (400), requests that
run past the time limit (504), and requests the queue ahead would not let finish in time (503 with
`Retry-After`, at once, before any work is done for them).

The model is loaded once; one inference thread runs it, because Hugging Face fast tokenizers are
not safe to call from several threads at once, and on a 2-core CPU parallel requests would only
compete for the same cores. Uploads are decoded before they queue for that thread. Requests are
served whole, first come first served, in steps of `STEP` items, with a lane for small requests
that goes first at step boundaries (`_ModelThread`); a request whose client hung up or whose time
ran out stops at the next step (or never starts), so it cannot hold the model while others time
out behind it.

Connections are bounded too (see `BoundedH11Protocol`): a client has `header_timeout_s` to send a
request's headers, and past `max_connections` the longest-idle connection is closed.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..model.tagger import Tagger
from ..data import MAX_CAPTION_CHARS, decode_image, open_image_bytes
from ..errors import MmtagError

STEP = 8  # items per inference step of a batch: how far a cancelled batch can run on
SMALL_BURST = 4  # small requests that may run in a row while a batch waits for its next step
SHARE_DECAY = 0.95  # per step: how fast the small lane's measured share of the model is forgotten
HEADROOM = 1.25  # admission plans for steps this much slower than measured: on 2 shared cores a
#                  lone 64-item batch's p99 was up to a third above its p50 (bench/serve_load.py)
DEADLINE = "mmtag.deadline"  # scope key: time.monotonic() at which the guard answers 504


@dataclass(frozen=True)
class Limits:
    """What one request, and one connection, may ask of the server."""

    max_upload_mb: float = 10.0  # whole request body
    max_side: int = 8192  # pixels per image side
    max_batch: int = 64  # items per /predict/batch
    timeout_s: float = 60.0  # per request, from its headers to its answer
    header_timeout_s: float = 10.0  # to send a request's headers (and to finish a refused body)
    max_connections: int = 100  # open at once; past it the longest-idle one is closed

    def __post_init__(self) -> None:
        for name, flag, low in (("max_upload_mb", "--max-upload-mb", 0), ("timeout_s", "--timeout", 0),
                                ("header_timeout_s", "--header-timeout", 0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > low):
                raise MmtagError(f"{flag} must be a finite number > {low} (got {value})")
        for name, flag in (("max_side", "--max-side"), ("max_batch", "--max-batch"),
                           ("max_connections", "--max-connections")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MmtagError(f"{flag} must be a whole number >= 1 (got {value})")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class _TooLarge(Exception):
    pass


class _ServiceTime:
    """Seconds a step of n items takes, learnt from the steps the model has run: an exponentially
    weighted moving average per step size (1..STEP), since a step's fixed cost (a model call, the
    tokenizer's start) makes a one-item step cost more per item than a full one, and one average
    per item would misjudge both. A size not yet seen is scaled from the nearest size that was.
    The first step of each size is not counted: it pays one-off costs (lazy initialisation, the
    CPU kernels' set-up for a new input shape), and counted, they had a fresh server refuse a
    lone batch in the benchmark until the average forgot them."""

    ALPHA = 0.2  # weight of the newest step: the load on the cores changes, recent steps say most

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._first: set[int] = set()  # sizes whose first (uncounted) step has run

    @property
    def known(self) -> bool:
        return bool(self._seconds)

    def add(self, items: int, seconds: float) -> None:
        if items not in self._first:
            self._first.add(items)
            return
        old = self._seconds.get(items)
        self._seconds[items] = seconds if old is None else old + self.ALPHA * (seconds - old)

    def step(self, items: int) -> float:
        if items in self._seconds:
            return self._seconds[items]
        near = min(self._seconds, key=lambda k: abs(k - items))
        return self._seconds[near] * items / near

    def request(self, items: int) -> float:
        """Seconds to run `items` more items of one request, a step at a time."""
        full, rest = divmod(items, STEP)
        return full * self.step(STEP) + (self.step(rest) if rest else 0.0)


class _Overloaded(Exception):
    """The work queued ahead would not let a request finish within its time."""

    def __init__(self, ahead_s: float, own_s: float, budget_s: float, timeout_s: float) -> None:
        # A retry gets a fresh timeout: it fits once the work ahead has shrunk to what the
        # timeout leaves after its own time (if nothing else arrives meanwhile).
        fits_at = max(0.0, timeout_s / HEADROOM - own_s)
        self.retry_after = max(1, math.ceil(ahead_s - fits_at))
        super().__init__(f"server busy: about {ahead_s:.1f} s of work is queued ahead of this request, "
                         f"which needs about {own_s:.1f} s itself, and it has {max(budget_s, 0):.1f} s "
                         f"left of the {timeout_s:g} s limit; retry after {self.retry_after} s")


@dataclass(eq=False)
class _Job:
    items: int
    run: Callable[[int, int], list[Any]]  # run(start, stop): the answers for items[start:stop]
    future: Future = field(default_factory=Future)
    done: int = 0  # items answered so far
    answers: list[Any] = field(default_factory=list)


class _ModelThread:
    """The one thread that runs the model, and the queue in front of it.

    Requests are served whole and first come first served, a step of STEP items at a time: the
    steps of two batches are never interleaved. Interleaved (round robin), k batches that arrive
    together all finish together, after k times one batch's time, so once that passes the timeout
    every one of them times out and all the work is wasted. Served whole, the first ones finish,
    and a request that the work queued ahead would make miss its deadline is refused at once
    (`_Overloaded`, a 503 with Retry-After), which is what keeps the queue bounded.

    Small requests (STEP items or fewer, one step) have a lane of their own that goes first at
    every step boundary, so a one-image request waits for the step running now, not for the
    batches queued ahead of it. A lane rather than plain shortest-job-first, because with SJF a
    steady stream of small requests could hold a batch back for good: here at most SMALL_BURST
    small requests run in a row while a batch waits, then the batch gets a step, so neither lane
    can starve the other and a batch's finishing time stays predictable.

    A job whose request gave up (its future cancelled: the client hung up or the deadline passed)
    is dropped at the next step boundary, run or not.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._small: deque[_Job] = deque()
        self._batches: deque[_Job] = deque()
        self._burst = 0  # small jobs run in a row while a batch waited
        self._batch_step = 0  # items of the batch step running now, 0 when none
        self.times = _ServiceTime()
        # decayed seconds of the small lane's steps, and of all steps, run while a batch waited
        self._small_s, self._contended_s = 0.0, 0.0
        threading.Thread(target=self._run, name="mmtag-infer", daemon=True).start()

    def check(self, items: int, budget_s: float, timeout_s: float) -> None:
        """Raise `_Overloaded` if a request of `items` items would be refused now (to refuse it
        before decoding its uploads)."""
        with self._cv:
            self._admit(items, budget_s, timeout_s)

    def submit(self, items: int, run: Callable[[int, int], list[Any]], budget_s: float,
               timeout_s: float) -> Future:
        """Queue a request of `items` items with `budget_s` seconds left to answer it: a future of
        its answers, or `_Overloaded`."""
        job = _Job(items, run)
        with self._cv:
            self._admit(items, budget_s, timeout_s)
            (self._small if items <= STEP else self._batches).append(job)
            self._cv.notify()
        return job.future

    def state(self) -> dict[str, Any]:
        """What waits now, and how long a new batch would wait for it (None until a step ran)."""
        with self._cv:
            self._prune()
            jobs = [*self._small, *self._batches]
            return {"requests": len(jobs), "items": sum(j.items - j.done for j in jobs),
                    "expected_wait_s": round(self._expect(STEP + 1)[0], 3) if self.times.known else None}

    def _admit(self, items: int, budget_s: float, timeout_s: float) -> None:
        self._prune()
        # With nothing queued a request always runs: an estimate can only be corrected by
        # running, so one too high (say, from a moment of contention) must not refuse forever.
        if not self.times.known or not (self._small or self._batches):
            return
        ahead, own = self._expect(items)
        if HEADROOM * (ahead + own) > budget_s:
            raise _Overloaded(ahead, own, budget_s, timeout_s)

    def _expect(self, items: int) -> tuple[float, float]:
        """Expected seconds before a new request of `items` items starts, and then to run it."""
        t = self.times
        small, own = sum(t.request(j.items - j.done) for j in self._small), t.request(items)
        if items > STEP:
            # A batch waits for every request queued now, and small requests that come meanwhile
            # go ahead of its steps (and of those of the batches ahead of it): they stretch the
            # batch lane's time by their measured share of the model while batches waited.
            share = min(0.9, self._small_s / self._contended_s) if self._contended_s else 0.0
            batches = sum(t.request(j.items - j.done) for j in self._batches)
            return small + batches / (1 - share), own / (1 - share)
        if not self._batches:
            return small, own
        # a small one waits for the small ones ahead, the batch step running now, and a batch
        # step each time SMALL_BURST small ones have run in a row
        running = t.step(self._batch_step) if self._batch_step else 0.0
        return small + running + (len(self._small) // SMALL_BURST) * t.step(STEP), own

    def _count_share(self, seconds: float, small: bool) -> None:
        """Count a step run while a batch waited (or a batch's own) towards the small lane's share."""
        if not self._contended_s:  # start as if the last 1 / (1 - decay) steps had been batch
            # steps, so that one early small step does not read as the small lane taking it all
            self._contended_s = self.times.step(STEP) / (1 - SHARE_DECAY)
        self._small_s = SHARE_DECAY * self._small_s + (seconds if small else 0.0)
        self._contended_s = SHARE_DECAY * self._contended_s + seconds

    def _prune(self) -> None:
        for lane in (self._small, self._batches):
            if any(j.future.cancelled() for j in lane):
                kept = [j for j in lane if not j.future.cancelled()]
                lane.clear()
                lane.extend(kept)

    def _next(self) -> tuple[_Job, deque[_Job]]:
        while True:
            self._prune()
            if self._small and (not self._batches or self._burst < SMALL_BURST):
                self._burst += bool(self._batches)
                return self._small[0], self._small
            if self._batches:
                self._burst = 0
                return self._batches[0], self._batches
            self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                job, lane = self._next()
                start, stop = job.done, min(job.done + STEP, job.items)
                self._batch_step = (stop - start) if lane is self._batches else 0
                contended = bool(self._batches)  # this step runs while a batch waits (or is one)
            error: BaseException | None = None
            began = time.perf_counter()
            try:
                answers = job.run(start, stop)
            except BaseException as exc:  # handed to the request that waits for it
                error, answers = exc, []
            seconds = time.perf_counter() - began
            with self._cv:
                self._batch_step = 0
                if error is None:
                    self.times.add(stop - start, seconds)
                    job.answers += answers
                    job.done = stop
                if contended and self.times.known:
                    self._count_share(seconds, small=lane is self._small)
                finished = error is not None or job.done == job.items
                if finished and job in lane:  # (a job cancelled during its step was pruned)
                    lane.remove(job)
            if finished and job.future.set_running_or_notify_cancel():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(job.answers)


class _Guard:
    """ASGI middleware for every HTTP request: a body over the limit (by header, or counted when
    chunked) gets 413; a request running past the time limit gets 504 instead of hanging.

    A chunked body is only known to be too large while the app reads it; FastAPI reports any
    failure while parsing a form as its own 400, so that answer is dropped and replaced by the 413.
    """

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limit, self.seconds = app, limits.max_bytes, limits.timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _send_json(send, 400, f"invalid Content-Length header {declared[:40].decode('latin-1')!r}")
            return
        if declared is not None and int(declared) > self.limit:
            await _send_json(send, 413, f"request body is {int(declared)} bytes; the limit is {self.limit}")
            return
        scope[DEADLINE] = time.monotonic() + self.seconds  # what the queue's admission plans for
        seen, started, too_large = 0, False, False

        async def counted() -> dict:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            if too_large:
                return  # the app's answer to a body cut short; the 413 below replaces it
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, counted, watched), self.seconds)
        except _TooLarge:
            pass
        except asyncio.TimeoutError:
            if not started:
                await _send_json(send, 504, f"request took longer than {self.seconds:g} s")
            return
        if too_large and not started:
            await _send_json(send, 413, f"request body exceeds the limit of {self.limit} bytes")


def _json_body(error: str) -> bytes:
    return json.dumps({"error": error}).encode()


async def _send_json(send: Any, status: int, error: str,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = _json_body(error)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _upload_status(exc: Exception) -> int:
    """422 for an image over the size limits, 415 for anything else that stops an upload
    decoding (the decoder's own words are never parsed for this)."""
    return 422 if getattr(exc, "too_large", False) else 415


async def _hung_up(receive: Any) -> None:
    """Return once the client has gone. Called after the body is read, so the server's next
    message for this request is `http.disconnect` (or none until the answer is sent)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(run: str | Path, limits: Limits | None = None) -> FastAPI:
    """The server's ASGI app for one run (loaded once, here)."""
    limits = limits or Limits()
    tagger = Tagger.load(run)
    ls = tagger.label_space
    assert ls is not None
    needs_image = "image" in tagger.modalities
    needs_text = "text" in tagger.modalities
    image_size = int(tagger.encoders["image"].image_size) if needs_image else 0  # type: ignore[attr-defined]

    def threshold_table(branch: str | None) -> dict[str, dict[str, float]]:
        return {k: {str(i): round(t, 6) for i, t in v.items()}
                for k, v in tagger.thresholds_by_label(branch).items()}

    # The thresholds each answer is decided by: the whole model's, and each branch's when it
    # answers alone (tuned here, once, rather than on the first such request).
    thresholds = {tuple(tagger.modalities): threshold_table(None),
                  **{(b,): threshold_table(b) for b in tagger.branches}}
    names = dict(zip(ls.ids, ls.names))
    model = _ModelThread()
    page = resources.files("mmtag.serve").joinpath("web/index.html").read_text(encoding="utf-8")

    app = FastAPI(title="mmtag", summary=f"multi-label image+caption tagger ({Path(run).name})")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body')}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(422, f"invalid request ({problems})")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own 404 / 405 and FastAPI's 400 for an unparseable body, in our shape.
        return _error(exc.status_code, f"{request.method} {request.url.path}: {str(exc.detail).rstrip('.')}",
                      headers=dict(exc.headers or {}))

    def decode(data: bytes) -> Any:
        """Decode fully, here, outside the inference queue: the model never sees a bad image,
        and decoding concurrent uploads does not wait for (or hold up) inference."""
        img = open_image_bytes(data, max_side=limits.max_side)
        pixels = decode_image(img, image_size)  # (3, S, S) uint8, exactly what predict would decode
        return Image.fromarray(pixels.transpose(1, 2, 0))  # predict's resize to S x S is then a copy

    async def read_image(upload: UploadFile | None, what: str) -> Any:
        if upload is None:
            return None  # whether it may be missing is `check_item`'s to say
        data = await upload.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise _Bad(413, f"{what}: file exceeds {limits.max_bytes} bytes")
        if not needs_image:
            return None  # a text-only model ignores images
        name = upload.filename or "upload"
        if not data:
            raise _Bad(422, f"{what} ({name}): empty file")
        try:
            return await asyncio.to_thread(decode, data)
        except Exception as exc:  # any decoder's failure on one upload is that upload's fault
            reason = " ".join(str(exc).split()) or exc.__class__.__name__  # one line
            raise _Bad(_upload_status(exc), f"{what} ({name}): cannot use this image: {reason}") from None

    def check_caption(caption: str | None, what: str) -> str | None:
        if caption is None or not caption.strip():
            return None  # whether it may be missing is `check_item`'s to say
        if len(caption) > MAX_CAPTION_CHARS:
            raise _Bad(422, f"{what}: caption is longer than {MAX_CAPTION_CHARS} characters")
        return caption

    def check_item(image: Any, caption: str | None, image_field: str, caption_field: str) -> None:
        """Refuse an item the model cannot answer, naming the missing field: every model needs
        one input it reads; only a late-fusion one answers from one of two."""
        given = [m for m, x in (("image", image), ("text", caption)) if x is not None]
        if tagger.can_predict_with(given):
            return
        need = {"image": (image_field, "an image file"), "text": (caption_field, "a non-empty caption")}
        missing = [m for m in tagger.modalities if m not in given]
        if tagger.branches:  # late fusion given nothing at all
            raise _Bad(422, f"{image_field}, {caption_field}: this model needs an image file, "
                            "a non-empty caption, or both")
        fields = ", ".join(need[m][0] for m in missing)
        why = (f" (head '{tagger.head_name}' fuses image and caption, so it answers only from both)"
               if given else "")
        raise _Bad(422, f"{fields}: this model needs {' and '.join(need[m][1] for m in missing)}{why}")

    def run_step(images: list[Any], captions: list[str | None]) -> list[dict[str, Any]]:
        # Items with the same inputs run together: a late-fusion model answers those with only a
        # caption (or only an image) from that branch, the others with the whole model.
        groups: dict[tuple[bool, bool], list[int]] = {}
        for k, (img, cap) in enumerate(zip(images, captions)):
            groups.setdefault((needs_image and img is not None, needs_text and cap is not None), []).append(k)
        out: list[dict[str, Any]] = [{}] * len(images)
        for (has_image, has_text), rows in groups.items():
            preds = tagger.predict([images[k] for k in rows] if has_image else None,
                                   [captions[k] for k in rows] if has_text else None)  # type: ignore[misc]
            for k, p in zip(rows, preds):
                out[k] = result(p)
        return out

    def result(p: Any) -> dict[str, Any]:
        used = tuple(p.modalities_used)
        return {"labels": [{"id": i, "name": n, "score": round(p.scores[i], 6)}
                           for i, n in zip(p.labels, p.names)],
                "scores": [{"id": i, "name": names[i], "score": round(s, 6)} for i, s in p.scores.items()],
                "thresholds": thresholds.get(used, thresholds[tuple(tagger.modalities)]),
                "modalities_used": list(used), "note": p.note}

    def budget(request: Request) -> float:
        """Seconds left before the guard answers this request 504."""
        return request.scope.get(DEADLINE, time.monotonic() + limits.timeout_s) - time.monotonic()

    def busy(exc: _Overloaded) -> _Bad:
        return _Bad(503, str(exc), {"Retry-After": str(exc.retry_after)})

    async def infer(request: Request, images: list[Any], captions: list[str | None]) -> list[dict[str, Any]]:
        """Queue the items for the model (or refuse them, 503) and wait for their answers for as
        long as someone waits: a timeout (the guard cancels this coroutine) or a hang-up cancels
        the job, which the model thread drops at its next step."""
        try:
            job = model.submit(len(images), lambda a, b: run_step(images[a:b], captions[a:b]),
                               budget(request), limits.timeout_s)
        except _Overloaded as exc:
            raise busy(exc) from None
        work = asyncio.wrap_future(job)  # cancelling it cancels the job
        gone = asyncio.ensure_future(_hung_up(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            # nginx's "client closed request"; nobody reads it, but the access log shows why
            raise _Bad(499, "the client closed the connection before the answer was ready")
        finally:
            work.cancel()
            gone.cancel()

    @app.exception_handler(_Bad)
    async def client_error(request: Request, exc: _Bad) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(MmtagError)
    async def refused(request: Request, exc: MmtagError) -> JSONResponse:
        return _error(422, str(exc))  # the API's own refusal of an input

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({exc.__class__.__name__}); see the server log")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, what each prediction needs, and the queue in front of the model."""
        return {"status": "ok", "run": Path(run).name, "modalities": tagger.modalities,
                "branches": list(tagger.branches), "head": tagger.head_name, "num_labels": len(ls),
                "queue": model.state()}

    @app.get("/labels")
    def labels() -> list[dict[str, Any]]:
        """Every label the model can predict."""
        return [{"id": i, "name": n} for i, n in zip(ls.ids, ls.names)]

    @app.post("/predict")
    async def predict(request: Request, image: UploadFile | None = File(None),
                      caption: str | None = Form(None)) -> dict[str, Any]:
        """One image + caption → predicted labels (with names and scores), every label's score,
        the thresholds used, and what the answer read (`modalities_used`, `note`). A late-fusion
        model also answers an image alone or a caption alone, from that branch."""
        img = await read_image(image, "image")
        cap = check_caption(caption, "caption")
        check_item(img, cap, "image", "caption")
        return (await infer(request, [img], [cap]))[0]

    @app.post("/predict/batch")
    async def predict_batch(request: Request, images: list[UploadFile] | None = File(None),
                            captions: list[str] | None = Form(None)) -> dict[str, Any]:
        """Items i = (images[i], captions[i]) → {"predictions": [one result per item]}. A
        late-fusion model also takes only images or only captions (or blank captions), answering
        those items from the branch they have."""
        n = max(len(images or []), len(captions or []))
        if n == 0:
            raise _Bad(422, "no items: send images and/or captions fields")
        if n > limits.max_batch:
            raise _Bad(413, f"{n} items; the limit is {limits.max_batch} per batch")
        # Both lists given: they pair up item by item, so they must be as long as each other.
        if needs_image and needs_text and images and captions and len(images) != len(captions):
            raise _Bad(422, f"got {len(images)} images but {len(captions)} captions")
        try:  # refused now rather than after decoding every upload
            model.check(n, budget(request), limits.timeout_s)
        except _Overloaded as exc:
            raise busy(exc) from None
        imgs = [await read_image(f, f"images[{k}]") for k, f in enumerate(images or [None] * n)]
        caps = [check_caption(c, f"captions[{k}]") for k, c in enumerate(captions or [None] * n)]
        for k in range(n):
            check_item(imgs[k], caps[k], f"images[{k}]", f"captions[{k}]")
        return {"predictions": await infer(request, imgs, caps)}

    app.add_middleware(_Guard, limits=limits)
    schema_of = app.openapi

    def openapi() -> dict[str, Any]:
        schema = schema_of()
        for name, body in schema.get("components", {}).get("schemas", {}).items():
            if name.startswith("Body_"):
                _plain_form_fields(body)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _plain_form_fields(body: dict[str, Any]) -> None:
    """Describe optional multipart fields as "absent or this", not "this or null".

    A form field cannot carry null, and FastAPI's `anyOf [..., null]` hides from client
    generators and schema fuzzers that `image` is a file upload (`format: binary`).
    """
    for prop in body.get("properties", {}).values():
        options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1 and len(prop["anyOf"]) == 2:
            del prop["anyOf"]
            prop.update(options[0])
        for node in (prop, prop.get("items", {})):
            if node.get("contentMediaType") == "application/octet-stream":
                node.setdefault("format", "binary")


class _Bad(Exception):
    """An error answer: its HTTP status, message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the bounds it lacks: uvicorn times out a connection only
    between requests (keep-alive), so one that never finishes its headers stays open for good.

    Here a connection has `header_timeout` seconds, from connecting or from its last answer, to
    send the next request's headers; the same clock bounds a body still arriving after the answer
    (e.g. the rest of an upload refused with 413), which uvicorn would read and drop for as long as
    it comes. Past `max_connections` the longest-idle connection (waiting for headers or between
    requests) is closed; if every connection is mid-request, the new one gets a JSON 503.
    Malformed requests get a JSON 400 instead of uvicorn's plain text one.
    """

    header_timeout: float = Limits.header_timeout_s
    max_connections: int = Limits.max_connections

    _idle_timer: asyncio.TimerHandle | None = None
    idle_since: float | None = None  # loop time the connection began waiting for a request

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_idle_clock()
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections
                    if c is not self and getattr(c, "idle_since", None) is not None]
            if idle:
                min(idle, key=lambda c: c.idle_since).close_idle()  # type: ignore[attr-defined]
            else:
                self.app = _busy  # answered once its headers arrive, then closed

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._between_requests():
            if self._idle_timer is None:  # not restarted by more bytes: a trickle cannot extend it
                self._start_idle_clock()
        else:
            self._stop_idle_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._between_requests():
            self._stop_idle_clock()
            self._start_idle_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_idle_clock()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = _json_body("invalid HTTP request (malformed request line, header or Content-Length)")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    def close_idle(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _between_requests(self) -> bool:
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def _start_idle_clock(self) -> None:
        self.idle_since = self.loop.time()
        self._idle_timer = self.loop.call_later(self.header_timeout, self._idle_timeout)

    def _stop_idle_clock(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer, self.idle_since = None, None

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self._between_requests():
            self.close_idle()


# What BoundedH11Protocol overrides and reads of uvicorn's H11Protocol: internals, not an API, so
# pyproject.toml pins the uvicorn releases this was tested on and `check_uvicorn` looks for each
# before a server starts, rather than a changed uvicorn serving without its bounds.
UVICORN_HOOKS = ("connection_made", "data_received", "on_response_complete", "connection_lost",
                 "send_400_response")
UVICORN_STATE = ("app", "loop", "conn", "connections", "transport", "cycle")


def check_uvicorn() -> None:
    """A one-line error naming what is missing when the installed uvicorn's H11Protocol lacks a
    method or per-connection attribute BoundedH11Protocol relies on."""
    import asyncio

    from uvicorn.server import ServerState

    missing = [f"{name}()" for name in UVICORN_HOOKS if not callable(getattr(H11Protocol, name, None))]
    loop = asyncio.new_event_loop()
    try:
        made = H11Protocol(uvicorn.Config(_busy), ServerState(), {}, _loop=loop)
        missing += [name for name in UVICORN_STATE if not hasattr(made, name)]
    except TypeError as e:  # its constructor changed
        missing.append(f"__init__ ({e})")
    finally:
        loop.close()
    if missing:
        raise MmtagError(f"mmtag serve does not support uvicorn {uvicorn.__version__}: its "
                         f"H11Protocol lacks {', '.join(missing)} (install the range "
                         "pyproject.toml pins)")


async def _busy(scope: dict, receive: Any, send: Any) -> None:
    await _send_json(send, 503, "too many open connections, all busy; retry shortly",
                     ((b"connection", b"close"), (b"retry-after", b"1")))


def server_config(app: Any, limits: Limits, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `app`, with the connection bounds of `limits`."""
    check_uvicorn()
    protocol = type("MmtagHTTPProtocol", (BoundedH11Protocol,),
                    {"header_timeout": limits.header_timeout_s, "max_connections": limits.max_connections})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None) -> None:
    """Run the server until interrupted."""
    limits = limits or Limits()
    uvicorn.Server(server_config(create_app(run, limits), limits, host, port)).run()
