"""HTTP face: `mmtag serve RUN` (FastAPI + uvicorn). Every answer comes from `mmtag.api`.

    GET  /               a web page: pick an image, type a caption, see labels and scores
    GET  /health         liveness and what the model needs
    GET  /labels         label ids and names
    POST /predict        multipart: image file + caption → labels, scores, thresholds
    POST /predict/batch  multipart: images[] + captions[] → one result per item
    GET  /docs           OpenAPI documentation (FastAPI's own)

Bad input gets a 4xx JSON `{"error": ...}`, never a 500: bodies over the upload limit (413),
files that are not images or exceed the dimension cap (415 / 422), missing fields (422).
The model is loaded once; a lock serialises inference, because Hugging Face fast tokenizers are
not safe to call from several threads at once, and on a 2-core CPU parallel requests would only
compete for the same cores.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from . import api
from .data import MAX_CAPTION_CHARS, open_image_bytes
from .errors import MmtagError


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_upload_mb: float = 10.0  # whole request body
    max_side: int = 8192  # pixels per image side
    max_batch: int = 64  # items per /predict/batch
    timeout_s: float = 60.0  # per request

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class _TooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware for every HTTP request: a body over the limit (by header, or counted when
    chunked) gets 413; a request running past the time limit gets 504 instead of hanging."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limit, self.seconds = app, limits.max_bytes, limits.timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, 413, f"request body is {int(declared)} bytes; the limit is {self.limit}")
            return
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, counted, watched), self.seconds)
        except _TooLarge:
            await _send_json(send, 413, f"request body exceeds the limit of {self.limit} bytes")
        except asyncio.TimeoutError:
            if not started:
                await _send_json(send, 504, f"request took longer than {self.seconds:g} s")


async def _send_json(send: Any, status: int, error: str) -> None:
    import json

    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(run: str | Path, limits: Limits | None = None) -> FastAPI:
    """The server's ASGI app for one run (loaded once, here)."""
    limits = limits or Limits()
    tagger = api.Tagger.load(run)
    lock = threading.Lock()
    ls = tagger.label_space
    assert ls is not None
    needs_image = "image" in tagger.modalities
    needs_text = "text" in tagger.modalities
    page = resources.files("mmtag").joinpath("web/index.html").read_text(encoding="utf-8")

    app = FastAPI(title="mmtag", summary=f"multi-label image+caption tagger ({Path(run).name})")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body')}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(422, f"invalid request ({problems})")

    async def read_image(upload: UploadFile | None, what: str) -> Any:
        if upload is None:
            if needs_image:
                raise _Bad(422, f"{what}: this model needs an image file")
            return None
        data = await upload.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise _Bad(413, f"{what}: file exceeds {limits.max_bytes} bytes")
        try:
            return open_image_bytes(data, max_side=limits.max_side)
        except ValueError as exc:
            status = 422 if "limit" in str(exc) or "too large" in str(exc) else 415
            raise _Bad(status, f"{what} ({upload.filename or 'upload'}): {exc}") from None

    def check_caption(caption: str | None, what: str) -> str | None:
        if caption is None or not caption.strip():
            if needs_text:
                raise _Bad(422, f"{what}: this model needs a non-empty caption")
            return None
        if len(caption) > MAX_CAPTION_CHARS:
            raise _Bad(422, f"{what}: caption is longer than {MAX_CAPTION_CHARS} characters")
        return caption

    def run_model(images: list[Any], captions: list[str | None]) -> list[dict[str, Any]]:
        with lock:
            preds = tagger.predict(images if needs_image else None,
                                   captions if needs_text else None)  # type: ignore[arg-type]
            thresholds = tagger.thresholds_by_label()
        names = dict(zip(ls.ids, ls.names))
        out = []
        for p in preds:
            out.append({
                "labels": [{"id": i, "name": n, "score": round(p.scores[i], 6)}
                           for i, n in zip(p.labels, p.names)],
                "scores": [{"id": i, "name": names[i], "score": round(s, 6)} for i, s in p.scores.items()],
                "thresholds": {k: {str(i): round(t, 6) for i, t in v.items()} for k, v in thresholds.items()},
            })
        return out

    @app.exception_handler(_Bad)
    async def client_error(request: Request, exc: _Bad) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(MmtagError)
    async def refused(request: Request, exc: MmtagError) -> JSONResponse:
        return _error(422, str(exc))  # the API's own refusal of an input (e.g. undecodable image)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({exc.__class__.__name__}); see the server log")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, and what each prediction needs."""
        return {"status": "ok", "run": Path(run).name, "modalities": tagger.modalities,
                "head": tagger.head_name, "num_labels": len(ls)}

    @app.get("/labels")
    def labels() -> list[dict[str, Any]]:
        """Every label the model can predict."""
        return [{"id": i, "name": n} for i, n in zip(ls.ids, ls.names)]

    @app.post("/predict")
    async def predict(image: UploadFile | None = File(None), caption: str | None = Form(None)) -> dict[str, Any]:
        """One image + caption → predicted labels (with names and scores), every label's score,
        and the thresholds used."""
        img = await read_image(image, "image")
        cap = check_caption(caption, "caption")
        return (await asyncio.to_thread(run_model, [img], [cap]))[0]

    @app.post("/predict/batch")
    async def predict_batch(images: list[UploadFile] | None = File(None),
                            captions: list[str] | None = Form(None)) -> dict[str, Any]:
        """Items i = (images[i], captions[i]) → {"predictions": [one result per item]}."""
        n = max(len(images or []), len(captions or []))
        if n == 0:
            raise _Bad(422, "no items: send images and/or captions fields")
        if n > limits.max_batch:
            raise _Bad(413, f"{n} items; the limit is {limits.max_batch} per batch")
        if needs_image and needs_text and len(images or []) != len(captions or []):
            raise _Bad(422, f"got {len(images or [])} images but {len(captions or [])} captions")
        imgs = [await read_image(f, f"images[{k}]") for k, f in enumerate(images or [None] * n)]
        caps = [check_caption(c, f"captions[{k}]") for k, c in enumerate(captions or [None] * n)]
        return {"predictions": await asyncio.to_thread(run_model, imgs, caps)}

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
    """A client error with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(run, limits), host=host, port=port, log_level="info")
