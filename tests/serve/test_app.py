"""The HTTP server: every endpoint, every error docs/usage.md lists with its exact status and JSON
shape, availability under timed-out, hung-up and slow clients (on a real uvicorn server), the page.

Every dependency here is a hard one (the package's or its `dev` extra's) and is imported, so a
missing one fails the suite instead of skipping it; only the browser test skips, when the machine
has no Chromium.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image, ImageFile

from mmtag import api
from mmtag.errors import MmtagError
from mmtag.serve.app import SMALL_BURST, STEP, Limits, create_app, server_config
from mmtag.data.synthetic import SyntheticPaths

LIMITS = Limits(max_upload_mb=0.5, max_side=2000, max_batch=4, timeout_s=30)


@pytest.fixture(scope="module")
def client(fused_run: Path) -> TestClient:
    return TestClient(create_app(fused_run, LIMITS))


@pytest.fixture(scope="module")
def item(tiny: SyntheticPaths) -> tuple[bytes, str, list[int]]:
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    return data.image_path(0).read_bytes(), data.captions[0], data.labels[0]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _is_error(r: httpx.Response, status: int, *mentions: str) -> None:
    """The error shape docs/usage.md gives: exactly `status`, JSON `{"error": "<one line>"}`, naming the field."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert "\n" not in body["error"]
    for word in mentions:
        assert word in body["error"], (word, body)


def test_openapi_docs_answer(client: TestClient) -> None:
    # the README points users at /docs for the API
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_health_and_labels(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["modalities"] == ["image", "text"] and h["branches"] == []
    labels = client.get("/labels").json()
    assert len(labels) == h["num_labels"] and {"id", "name"} <= set(labels[0])


def test_predict_matches_the_python_api(client: TestClient, fused_run: Path,
                                        item: tuple[bytes, str, list[int]], tiny: SyntheticPaths) -> None:
    image, caption, _ = item
    r = client.post("/predict", files={"image": ("a.jpg", image, "image/jpeg")}, data={"caption": caption})
    assert r.status_code == 200, r.text
    out = r.json()
    data, _ = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)
    want = api.Tagger.load(fused_run).predict([data.image_path(0)], [caption])[0]
    assert [l["id"] for l in out["labels"]] == want.labels
    assert all(l["name"] for l in out["labels"])
    assert len(out["scores"]) == len(want.scores)
    for s in out["scores"]:
        assert s["score"] == pytest.approx(want.scores[s["id"]], abs=1e-5)
    assert set(out["thresholds"]) == {"fused"}
    assert out["modalities_used"] == ["image", "text"] and out["note"] is None


def test_batch_returns_one_result_per_item(client: TestClient, item: tuple[bytes, str, list[int]]) -> None:
    image, caption, _ = item
    files = [("images", ("a.jpg", image, "image/jpeg")), ("images", ("b.jpg", image, "image/jpeg"))]
    r = client.post("/predict/batch", files=files, data={"captions": [caption, "a dog"]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and all(p["labels"] for p in preds)


# docs/usage.md: "Limits: --max-upload-mb (whole body, also when chunked; 413), --max-side (422) ...
# Files that are not images get 415, missing or empty fields 422; every error is JSON
# {"error": "..."} naming the field."
BAD_REQUESTS = [("not_image", 415, "image"), ("truncated_jpeg", 415, "image"), ("empty_file", 422, "image"),
                ("missing_image", 422, "image"), ("missing_caption", 422, "caption"),
                ("blank_caption", 422, "caption"), ("long_caption", 422, "caption"),
                ("too_wide", 422, "2500x10"), ("oversized_body", 413, "limit")]


@pytest.mark.parametrize("case,status,mention", BAD_REQUESTS, ids=[c for c, _, _ in BAD_REQUESTS])
def test_bad_requests_get_their_status_and_json_error(client: TestClient, item: tuple[bytes, str, list[int]],
                                                      case: str, status: int, mention: str) -> None:
    image, caption, _ = item
    files: dict = {"image": ("a.jpg", image, "image/jpeg")}
    data: dict = {"caption": caption}
    if case == "not_image":
        files = {"image": ("a.jpg", b"%PDF-1.4 definitely not a picture", "image/jpeg")}
    elif case == "empty_file":
        files = {"image": ("a.jpg", b"", "image/jpeg")}
    elif case == "missing_image":
        files = {}
    elif case == "missing_caption":
        data = {}
    elif case == "blank_caption":
        data = {"caption": "   "}
    elif case == "too_wide":
        files = {"image": ("w.png", _png(2500, 10), "image/png")}
    elif case == "oversized_body":
        files = {"image": ("big.jpg", b"\xff" * 600_000, "image/jpeg")}
    elif case == "long_caption":
        data = {"caption": "word " * 5000}
    elif case == "truncated_jpeg":
        files = {"image": ("t.jpg", image[: len(image) // 3], "image/jpeg")}
    _is_error(client.post("/predict", files=files, data=data), status, mention)


@pytest.mark.parametrize("bad,status", [(b"", 422), (b"GIF89a not really", 415), (_png(2500, 10), 422)])
def test_a_bad_item_in_a_batch_is_named(client: TestClient, item: tuple[bytes, str, list[int]],
                                        bad: bytes, status: int) -> None:
    image, caption, _ = item
    files = [("images", ("a.jpg", image, "image/jpeg")), ("images", ("b.jpg", bad, "image/jpeg"))]
    r = client.post("/predict/batch", files=files, data={"captions": [caption, caption]})
    _is_error(r, status, "images[1]", "b.jpg")


@pytest.mark.parametrize("exc", [NotImplementedError, AttributeError, TypeError, IndexError, KeyError,
                                 struct.error, RuntimeError, MemoryError])
def test_any_decoder_failure_is_415_never_500(client: TestClient, item: tuple[bytes, str, list[int]],
                                              monkeypatch: pytest.MonkeyPatch,
                                              exc: type[BaseException]) -> None:
    """Pillow's decoders raise more than OSError/ValueError on corrupt input; whichever one a
    file's decoder raises, the upload is refused as that upload's fault (415), naming the field."""
    image, caption, _ = item

    def broken(self: ImageFile.ImageFile) -> Any:
        raise exc("a decoder's own failure")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    r = client.post("/predict", files={"image": ("a.jpg", image, "image/jpeg")}, data={"caption": caption})
    _is_error(r, 415, "image (a.jpg)")
    files = [("images", ("a.jpg", image, "image/jpeg")), ("images", ("b.jpg", image, "image/jpeg"))]
    r = client.post("/predict/batch", files=files, data={"captions": [caption, caption]})
    _is_error(r, 415, "images[0] (a.jpg)")


# ------------------------------------------------------------------ one input for late fusion
@pytest.fixture(scope="module")
def late_run(tiny: SyntheticPaths, cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model (mean late fusion, five folds, stacked), trained briefly."""
    from mmtag import Config

    cfg = Config().override({"cache_dir": cache_dir, "train.epochs": 3, "model.hidden": 16,
                             "data.workers": 0})
    out = tmp_path_factory.mktemp("runs") / "late"
    api.train(tiny.train_csv, tiny.images, out, cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def late_client(late_run: Path) -> TestClient:
    return TestClient(create_app(late_run, LIMITS))


def _same_answer(out: dict[str, Any], want: api.Prediction) -> None:
    assert [l["id"] for l in out["labels"]] == want.labels
    for s in out["scores"]:
        assert s["score"] == pytest.approx(want.scores[s["id"]], abs=1e-5)
    assert out["modalities_used"] == want.modalities_used and out["note"] == want.note


def test_late_fusion_answers_one_input_from_its_branch(late_client: TestClient, late_run: Path,
                                                       tiny: SyntheticPaths,
                                                       item: tuple[bytes, str, list[int]]) -> None:
    """A caption alone (or an image alone) is answered by that branch, as the Python API answers
    it, with the branch's own thresholds, and the answer says which branch it came from."""
    image, caption, _ = item
    h = late_client.get("/health").json()
    assert h["head"] == "mean" and h["branches"] == ["image", "text"]
    tagger = api.Tagger.load(late_run)
    path = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)[0].image_path(0)
    r = late_client.post("/predict", data={"caption": caption})
    assert r.status_code == 200, r.text
    out = r.json()
    _same_answer(out, tagger.predict(captions=[caption])[0])
    assert out["modalities_used"] == ["text"] and out["note"] == "image missing: text branch only"
    assert out["thresholds"] == {"text": {str(i): round(t, 6) for i, t in
                                          tagger.thresholds_by_label("text")["text"].items()}}
    r = late_client.post("/predict", files={"image": ("a.jpg", image, "image/jpeg")}, data={"caption": " "})
    assert r.status_code == 200, r.text
    out = r.json()
    _same_answer(out, tagger.predict(images=[path])[0])
    assert out["modalities_used"] == ["image"] and out["note"] == "caption missing: image branch only"
    assert set(out["thresholds"]) == {"image"}
    r = late_client.post("/predict", files={"image": ("a.jpg", image, "image/jpeg")}, data={"caption": caption})
    out = r.json()
    assert out["modalities_used"] == ["image", "text"] and out["note"] is None
    assert set(out["thresholds"]) == {"fused"}
    _is_error(late_client.post("/predict", data={"caption": ""}), 422, "image, caption", "or both")


def test_late_fusion_batches_answer_each_item_from_what_it_has(late_client: TestClient, late_run: Path,
                                                               tiny: SyntheticPaths,
                                                               item: tuple[bytes, str, list[int]]) -> None:
    image, caption, _ = item
    tagger = api.Tagger.load(late_run)
    path = api.read_dataset(tiny.holdout_csv, tiny.images, labelled=True)[0].image_path(0)
    r = late_client.post("/predict/batch", data={"captions": [caption, "a dog"]})
    assert r.status_code == 200, r.text
    for out, want in zip(r.json()["predictions"], tagger.predict(captions=[caption, "a dog"]), strict=True):
        _same_answer(out, want)
        assert out["modalities_used"] == ["text"]
    r = late_client.post("/predict/batch", files=[("images", ("a.jpg", image, "image/jpeg"))])
    assert r.status_code == 200, r.text
    [out] = r.json()["predictions"]
    _same_answer(out, tagger.predict(images=[path])[0])
    # one item with both inputs, one with its caption left blank: each answered by what it has
    files = [("images", ("a.jpg", image, "image/jpeg")), ("images", ("b.jpg", image, "image/jpeg"))]
    r = late_client.post("/predict/batch", files=files, data={"captions": [caption, ""]})
    assert r.status_code == 200, r.text
    both, alone = r.json()["predictions"]
    _same_answer(both, tagger.predict([path], [caption])[0])
    _same_answer(alone, tagger.predict(images=[path])[0])
    assert (both["modalities_used"], alone["modalities_used"]) == (["image", "text"], ["image"])
    r = late_client.post("/predict/batch", files=files, data={"captions": [caption]})
    _is_error(r, 422, "2 images but 1 captions")


def test_early_fusion_refuses_one_input_naming_the_missing_field(client: TestClient,
                                                                 item: tuple[bytes, str, list[int]]) -> None:
    image, caption, _ = item
    r = client.post("/predict", data={"caption": caption})
    _is_error(r, 422, "image: this model needs an image file", "head 'concat' fuses image and caption")
    r = client.post("/predict", files={"image": ("a.jpg", image, "image/jpeg")})
    _is_error(r, 422, "caption: this model needs a non-empty caption", "head 'concat'")
    _is_error(client.post("/predict/batch", data={"captions": [caption, caption]}), 422,
              "images[0]: this model needs an image file", "head 'concat'")
    files = [("images", ("a.jpg", image, "image/jpeg")), ("images", ("b.jpg", image, "image/jpeg"))]
    _is_error(client.post("/predict/batch", files=files, data={"captions": [caption, " "]}), 422,
              "captions[1]: this model needs a non-empty caption")


def test_bad_batches(client: TestClient, item: tuple[bytes, str, list[int]]) -> None:
    image, caption, _ = item
    _is_error(client.post("/predict/batch"), 422, "no items")
    too_many = [("images", (f"{k}.jpg", image, "image/jpeg")) for k in range(5)]
    r = client.post("/predict/batch", files=too_many, data={"captions": [caption] * 5})
    _is_error(r, 413, "5 items", "limit is 4")
    r = client.post("/predict/batch", files=too_many[:2], data={"captions": [caption]})
    _is_error(r, 422, "2 images but 1 captions")


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n\r\n"
    for _ in range(total // size):
        yield b"\xff" * size


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    """No Content-Length to refuse up front: the body is counted as it arrives."""
    r = client.post("/predict", content=_chunks(1024 * 1024),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    _is_error(r, 413, "exceeds the limit of 524288 bytes")


def test_unknown_path_wrong_method_and_unparseable_bodies_are_json(client: TestClient) -> None:
    _is_error(client.get("/nope"), 404, "Not Found", "/nope")
    r = client.get("/predict")
    _is_error(r, 405, "Method Not Allowed")
    assert r.headers["allow"] == "POST"
    _is_error(client.delete("/health"), 405)
    r = client.post("/predict", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data"})
    _is_error(r, 400, "POST /predict", "boundary")
    r = client.post("/predict", content=b"x", headers={"content-length": "1x"})
    _is_error(r, 400, "Content-Length")


def test_limits_are_refused_out_of_range() -> None:
    for bad, flag in [({"timeout_s": 0}, "--timeout"), ({"timeout_s": float("nan")}, "--timeout"),
                      ({"max_upload_mb": -1}, "--max-upload-mb"), ({"max_batch": 0}, "--max-batch"),
                      ({"max_side": 0}, "--max-side"), ({"header_timeout_s": 0}, "--header-timeout"),
                      ({"max_connections": 0}, "--max-connections")]:
        with pytest.raises(MmtagError, match=flag):
            Limits(**bad)  # type: ignore[arg-type]


def test_page_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="caption"' in page.text and 'type="file"' in page.text
    assert 'id="used"' in page.text and "modalities_used" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/predict/batch", "/labels", "/health"} <= set(paths)


def test_concurrent_requests_are_answered(client: TestClient, item: tuple[bytes, str, list[int]]) -> None:
    image, caption, _ = item
    results: list[int] = []

    def call() -> None:
        r = client.post("/predict", files={"image": ("a.jpg", image, "image/jpeg")}, data={"caption": caption})
        results.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6


# ------------------------------------------------------------------ availability
class SlowModel:
    """Stands in for Tagger.predict: `per_item` seconds per item, counting the items it ran and
    logging each call's (items, first caption). While `gate` is set to an unset Event, a call
    waits for it (after setting `entered`), holding the model thread at a known step."""

    def __init__(self, per_item: float) -> None:
        self.per_item, self.items, self.calls = per_item, 0, 0
        self.log: list[tuple[int, str | None]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, tagger: api.Tagger, images: list[Any] | None = None,
                 captions: list[str] | None = None) -> list[api.Prediction]:
        n = len(images if images is not None else captions or [])
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=30)
        time.sleep(self.per_item * n)
        self.items += n
        self.calls += 1
        self.log.append((n, captions[0] if captions else None))
        assert tagger.label_space is not None
        return [api.Prediction(labels=[], names=[], scores={i: 0.0 for i in tagger.label_space.ids})] * n


@pytest.fixture
def slow_model(monkeypatch: pytest.MonkeyPatch) -> SlowModel:
    model = SlowModel(per_item=0.05)
    monkeypatch.setattr(api.Tagger, "predict",
                        lambda self, images=None, captions=None: model(self, images, captions))
    return model


@pytest.fixture(scope="module")
def quick_app(fused_run: Path) -> FastAPI:
    """Times out after 1.5 s; takes batches of 64."""
    return create_app(fused_run, Limits(max_upload_mb=2, max_side=2000, max_batch=64, timeout_s=1.5))


@pytest.fixture(scope="module")
def patient_app(fused_run: Path) -> FastAPI:
    """Waits 30 s; takes batches of 64 (served by a real uvicorn below)."""
    return create_app(fused_run, Limits(max_upload_mb=2, max_side=2000, max_batch=64, timeout_s=30))


def _batch(item: tuple[bytes, str, list[int]], n: int, caption: str | None = None) -> dict[str, Any]:
    image, default, _ = item
    return {"files": [("images", (f"{k}.jpg", image, "image/jpeg")) for k in range(n)],
            "data": {"captions": [caption or default] * n}}


# ---- a real uvicorn server on loopback, with mmtag's connection bounds
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serving(app: FastAPI, limits: Limits) -> Iterator[int]:
    port = _free_port()
    server = uvicorn.Server(server_config(app, limits, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _connect(port: int, partial: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if partial:
        sock.sendall(partial)
    return sock


def _closed(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (having sent nothing)."""
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _raw_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response (headers, then Content-Length bytes of body) from `sock`."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 1 << 30)) and (chunk := sock.recv(65536)):
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_timed_out_requests_stop_and_free_the_model(quick_app: FastAPI, slow_model: SlowModel,
                                                    item: tuple[bytes, str, list[int]]) -> None:
    """Two 64-item batches (3.2 s of model time each) run past the 1.5 s limit: the first gets
    504 and stops at the next step; the second, behind it, gets 504 without running (or 503 at
    once, if a step of the first had been timed when it came); so the next client is answered
    at once (it used to wait behind 6.4 s of work nobody would read, and time out too)."""
    with _serving(quick_app, Limits()) as port:
        url = f"http://127.0.0.1:{port}"
        answers: list[httpx.Response] = []
        batches = [threading.Thread(target=lambda: answers.append(
            httpx.post(f"{url}/predict/batch", timeout=30, **_batch(item, 64)))) for _ in range(2)]
        for t in batches:
            t.start()
        for t in batches:
            t.join()
        assert sorted(r.status_code for r in answers) in ([503, 504], [504, 504]), [r.text for r in answers]
        for r in answers:
            _is_error(r, r.status_code, "longer than 1.5 s" if r.status_code == 504 else "server busy")
        image, caption, _ = item
        r = httpx.post(f"{url}/predict", files={"image": ("a.jpg", image, "image/jpeg")},
                       data={"caption": caption}, timeout=30)
        assert r.status_code == 200, r.text  # within its own 1.5 s
        time.sleep(0.5)  # a step still running has ended by now
    # 1.5 s of model time is < 4 steps of 8 items; one more may be running at the timeout.
    # Nothing else of the 128 items ran.
    assert slow_model.items <= 5 * STEP + 1, slow_model.items


def _queued(url: str, requests: int) -> None:
    """Wait until `requests` requests wait for (or run on) the model, as /health reports."""
    for _ in range(400):
        if httpx.get(f"{url}/health", timeout=5).json()["queue"]["requests"] == requests:
            return
        time.sleep(0.025)
    raise AssertionError(f"never {requests} requests queued")


def _post_in_thread(url: str, answers: dict[str, httpx.Response], name: str,
                    **request: Any) -> threading.Thread:
    def post() -> None:
        answers[name] = httpx.post(url, timeout=60, **request)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_batches_are_served_whole_and_a_full_queue_is_refused_at_once(
        fused_run: Path, slow_model: SlowModel, item: tuple[bytes, str, list[int]]) -> None:
    """Batches A and B (16 items, 1.6 s of model time each) and C (32 items, 3.2 s) come together
    under a 6 s limit: each fits alone, A then B fit, A then B then C do not. A and B are answered
    200, one after the other, never a step of each in turn; C is refused at once with 503 +
    Retry-After, before anything of it runs, instead of running into its timeout. (The model is
    held at A's first step meanwhile, so what C finds queued is certain, not a matter of timing;
    the step-time estimate can only be above the fake model's sleeps.)"""
    slow_model.per_item = 0.1
    limits = Limits(max_upload_mb=2, max_side=2000, max_batch=64, timeout_s=6)
    with _serving(create_app(fused_run, limits), Limits()) as port:
        url = f"http://127.0.0.1:{port}"
        batch = f"{url}/predict/batch"
        warm = httpx.post(batch, timeout=60, **_batch(item, 16, "warm-up"))  # its 2nd step is timed: ~0.8 s
        assert warm.status_code == 200, warm.text
        slow_model.gate, slow_model.entered = threading.Event(), threading.Event()
        answers: dict[str, httpx.Response] = {}
        threads = [_post_in_thread(batch, answers, "A", **_batch(item, 16, "A"))]
        assert slow_model.entered.wait(timeout=30)  # A's first step holds the model
        threads.append(_post_in_thread(batch, answers, "B", **_batch(item, 16, "B")))
        _queued(url, 2)  # B: 1.6 s ahead + 1.6 s its own fits in 6 s
        c = httpx.post(batch, timeout=60, **_batch(item, 32, "C"))  # 3.2 s ahead + 3.2 s does not
        _is_error(c, 503, "server busy", "6 s limit")
        assert int(c.headers["retry-after"]) >= 1, c.headers
        assert httpx.get(f"{url}/health", timeout=5).json()["queue"]["requests"] == 2
        slow_model.gate.set()
        for t in threads:
            t.join()
    assert answers["A"].status_code == 200, answers["A"].text
    assert answers["B"].status_code == 200, answers["B"].text
    assert len(answers["B"].json()["predictions"]) == 16
    # whole requests in order; nothing of C ever ran
    assert slow_model.log == [(8, "warm-up")] * 2 + [(8, "A")] * 2 + [(8, "B")] * 2, slow_model.log


def test_small_requests_go_first_but_never_starve_a_batch(patient_app: FastAPI, slow_model: SlowModel,
                                                          item: tuple[bytes, str, list[int]]) -> None:
    """While a batch runs, one-image requests go ahead of its next step; but after SMALL_BURST of
    them in a row the batch gets a step, however many small ones wait."""
    slow_model.per_item = 0.02
    image, _, _ = item
    with _serving(patient_app, Limits()) as port:
        url = f"http://127.0.0.1:{port}"
        slow_model.gate = threading.Event()
        answers: dict[str, httpx.Response] = {}
        threads = [_post_in_thread(f"{url}/predict/batch", answers, "batch",
                                   **_batch(item, 3 * STEP, "batch"))]
        assert slow_model.entered.wait(timeout=30)  # the batch's first step holds the model
        for k in range(SMALL_BURST + 2):
            threads.append(_post_in_thread(f"{url}/predict", answers, f"s{k}", data={"caption": f"s{k}"},
                                           files={"image": ("a.jpg", image, "image/jpeg")}))
            _queued(url, k + 2)  # in this order
        slow_model.gate.set()
        for t in threads:
            t.join()
    assert all(r.status_code == 200 for r in answers.values()), {k: r.text for k, r in answers.items()}
    singles = [(1, f"s{k}") for k in range(SMALL_BURST + 2)]
    assert slow_model.log == [(STEP, "batch"), *singles[:SMALL_BURST], (STEP, "batch"),
                              *singles[SMALL_BURST:], (STEP, "batch")], slow_model.log


def test_connections_that_never_finish_their_headers_are_closed(patient_app: FastAPI) -> None:
    """A slowloris holds connections by never ending its headers (or sending nothing, or one
    byte at a time); each must be closed once the header time is up, and a well-behaved client
    is still answered."""
    with _serving(patient_app, Limits(header_timeout_s=0.5)) as port:
        silent = _connect(port)
        partial = _connect(port, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        trickle = _connect(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        t0 = time.monotonic()
        closed_after = None
        while time.monotonic() - t0 < 5:  # one byte every 0.1 s never restarts the clock
            try:
                trickle.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - t0
                break
            if _closed(trickle, 0.1):
                closed_after = time.monotonic() - t0
                break
        assert closed_after is not None and closed_after < 1.5, closed_after
        assert _closed(silent, 1.0) and _closed(partial, 1.0)
        # a keep-alive connection that starts a second request and stalls is closed too
        kept = _connect(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _raw_response(kept)[0] == 200
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        assert _closed(kept, 2.0)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        for s in (silent, partial, trickle, kept):
            s.close()


def test_past_max_connections_the_longest_idle_is_closed(patient_app: FastAPI, slow_model: SlowModel,
                                                          item: tuple[bytes, str, list[int]]) -> None:
    with _serving(patient_app, Limits(header_timeout_s=30, max_connections=3)) as port:
        idle = []
        for _ in range(3):
            idle.append(_connect(port, b"GET /health HTTP/1.1\r\n"))
            time.sleep(0.05)
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert r.status_code == 200
        assert _closed(idle[0], 1.0)  # the oldest made room
        assert not _closed(idle[2], 0.3)
        for s in idle:
            s.close()
        # every connection mid-request: a new one is told so, in JSON, instead of queueing
        slow_model.per_item = 0.5
        url = f"http://127.0.0.1:{port}/predict/batch"
        busy = [threading.Thread(target=lambda: httpx.post(url, timeout=30, **_batch(item, 2)))
                for _ in range(3)]
        for t in busy:
            t.start()
        time.sleep(0.4)
        _is_error(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5), 503, "too many open connections")
        for t in busy:
            t.join()


def test_malformed_http_gets_json_errors(patient_app: FastAPI) -> None:
    with _serving(patient_app, Limits(header_timeout_s=5)) as port:
        for request in (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                        b"NOT HTTP AT ALL\r\n\r\n"):
            status, headers, body = _raw_response(_connect(port, request))
            assert status == 400 and headers["content-type"] == "application/json", (request, headers)
            assert set(httpx.Response(400, content=body).json()) == {"error"}
        # chunked over the limit through uvicorn's own HTTP parser: 413, and the client reads it
        r = httpx.post(f"http://127.0.0.1:{port}/predict", content=_chunks(3 * 1024 * 1024),
                       headers={"content-type": "multipart/form-data; boundary=b"}, timeout=10)
        _is_error(r, 413, "exceeds the limit")


def test_a_client_that_hangs_up_stops_its_inference(patient_app: FastAPI, slow_model: SlowModel,
                                                    item: tuple[bytes, str, list[int]]) -> None:
    """A 64-item batch is 3.2 s of model time; its client leaves after 0.2 s: the batch stops at
    the next step instead of running to the end for nobody."""
    with _serving(patient_app, Limits()) as port:
        built = httpx.Request("POST", f"http://127.0.0.1:{port}/predict/batch", **_batch(item, 64))
        head = "".join(f"{k}: {v}\r\n" for k, v in built.headers.items())
        sock = _connect(port, f"POST /predict/batch HTTP/1.1\r\n{head}\r\n".encode() + built.read())
        time.sleep(0.2)
        sock.close()
        time.sleep(3.5)  # the whole batch would have run by now
        assert slow_model.items <= 2 * STEP, slow_model.items
        image, caption, _ = item
        r = httpx.post(f"http://127.0.0.1:{port}/predict", files={"image": ("a.jpg", image, "image/jpeg")},
                       data={"caption": caption}, timeout=30)
        assert r.status_code == 200


# ----------------------------------------------------------------------- browser test
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.browser
def test_web_page_in_headless_chromium(client: TestClient, fused_run: Path,
                                       item: tuple[bytes, str, list[int]], tmp_path: Path) -> None:
    """Upload an image, type a caption, see label chips and score bars; save a screenshot.
    Chromium is system software (`make test` installs it where it can): without it, this skips."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    from playwright import sync_api  # the dev extra's: a missing one fails, it does not skip

    with _serving(client.app, LIMITS) as port:  # type: ignore[arg-type]
        image, caption, _ = item
        (tmp_path / "item.jpg").write_bytes(image)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#image", str(tmp_path / "item.jpg"))
            page.fill("#caption", caption)
            page.click("#submit")
            page.wait_for_selector("#chips .chip", timeout=60_000)
            chips = page.locator("#chips .chip").all_inner_texts()
            bars = page.locator("#bars .bar").count()
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        want = [p.names for p in api.Tagger.load(fused_run).predict([tmp_path / "item.jpg"], [caption])][0]
        assert chips == want
        assert bars == len(api.info(fused_run)["labels"]["ids"])
        assert shot.stat().st_size > 10_000
        if os.environ.get("MMTAG_SCREENSHOT_DIR"):  # how the screenshot in docs/usage.md is refreshed
            shutil.copy(shot, Path(os.environ["MMTAG_SCREENSHOT_DIR"]) / "serve.png")


# --- Fuzzing every endpoint from the OpenAPI schema (schemathesis): no input may cause a 5xx.
# Driven through hypothesis directly (seeded, derandomized) rather than schemathesis' pytest
# plugin, which does not load under pytest 9.
@pytest.mark.parametrize("mode", ["positive", "negative", "positive+image"])
def test_schema_fuzz_never_5xx(client: TestClient, item: tuple[bytes, str, list[int]], mode: str) -> None:
    """Schema-generated requests; "+image" puts a real JPEG into each generated body, so the
    fuzzed fields (captions, extra fields) reach the model instead of stopping at validation.
    Every answer is < 500, and every error is the JSON `{"error": ...}` shape."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/health", "/labels", "/predict", "/predict/batch"}
    statuses: dict[str, list[int]] = {}
    for op in operations:
        @settings(max_examples=25, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(schemathesis.GenerationMode(mode.split("+")[0])))
        def call(case) -> None:
            if mode.endswith("+image") and isinstance(case.body, dict):
                if case.path == "/predict":
                    case.body["image"] = item[0]
                elif case.path == "/predict/batch":
                    captions = case.body.get("captions")
                    n = len(captions) if isinstance(captions, list) and captions else 1
                    case.body["images"] = [item[0]] * n
            response = case.call()
            statuses.setdefault(f"{case.method} {case.path}", []).append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path}: {response.status_code} {response.text[:300]}")
            if response.status_code >= 400:
                assert response.headers["content-type"][0].startswith("application/json")
                assert set(response.json()) == {"error"}, response.text[:300]

        try:
            call()
        except Unsatisfiable:
            # A GET without parameters has no invalid form; negative mode has nothing to send.
            assert mode == "negative" and op.method.upper() == "GET", op.path
    # every operation with inputs was really exercised
    for name in ("POST /predict", "POST /predict/batch"):
        assert len(statuses[name]) >= 10, statuses
    if mode == "positive+image":  # some generated requests were answered by the model
        assert 200 in statuses["POST /predict"] and 200 in statuses["POST /predict/batch"], statuses


# ---- uvicorn internals: BoundedH11Protocol subclasses a non-public class
def test_the_installed_uvicorn_is_in_the_pinned_range_and_has_what_the_bounds_use() -> None:
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    from mmtag.serve.app import check_uvicorn

    pinned = next(Requirement(r) for r in requires("mmtag") or [] if Requirement(r).name == "uvicorn")
    assert pinned.specifier.contains(version("uvicorn")), (version("uvicorn"), str(pinned))
    assert pinned.specifier and all(s.operator in (">=", "<") for s in pinned.specifier)  # a range
    check_uvicorn()


def test_a_uvicorn_without_a_hook_the_bounds_use_is_refused_by_name(monkeypatch) -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from mmtag.serve.app import check_uvicorn, server_config, Limits

    monkeypatch.delattr(H11Protocol, "on_response_complete")
    with pytest.raises(MmtagError, match=r"does not support uvicorn .*lacks on_response_complete\(\)"):
        check_uvicorn()
    with pytest.raises(MmtagError, match="on_response_complete"):
        server_config(object(), Limits())
