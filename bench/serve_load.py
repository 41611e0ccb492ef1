"""Issue-7/14/29 benchmark: a bounded loopback load test of `mmtag serve`, also under hostile clients
and under concurrent large batches.

    .venv/bin/python bench/serve_load.py --run RUN [--clients 4] [--seconds 60] [--image a.jpg]
        [--slowloris 0] [--slow-body 0] [--timeouts 0 --batch 64] [--server-arg=--timeout=2 ...]
    .venv/bin/python bench/serve_load.py --run RUN --batch-clients 1,2,4,8 [--seconds 60]
        [--batch 64] [--server-arg=--timeout=N ...]

Starts `mmtag serve RUN` on a free loopback port, lets CLIENTS well-behaved threads post /predict
(one image + caption each, plus one bad request in ten, which must get a 4xx) for SECONDS, then
stops the server and prints, for the well-behaved clients, requests/s, latency percentiles, 5xx
and connection failures, status counts, and the server's peak resident memory and open sockets.

Alongside them, optionally:
  --slowloris N  N connections that send a request line and then one header byte every
                 --trickle seconds, never finishing their headers (reconnecting when closed);
  --slow-body N  N connections that send complete headers for a 1 MB upload and then one body
                 byte every --trickle seconds (reconnecting when closed);
  --timeouts N   N clients posting /predict/batch of --batch items, sized to run past the
                 server's --timeout (pass it with --server-arg=--timeout=2): each should get 504
                 and must not hold the model while the well-behaved clients wait.

With --batch-clients C1,C2,... (issue 29) it measures goodput instead, on one server: for each
concurrency C in turn, C clients post --batch-item /predict/batch requests in a loop and one client
posts single-item /predict requests, for SECONDS; then it prints, per class (batch / single),
goodput (200 answers per second of the level, which ends once every request sent before SECONDS
is answered), p50 and p99 latency of the 200 answers, p99 of every answer,
and the counts of 200 / 503 / 504. A client told 503 waits the answer's Retry-After (bounded by
the time left) before its next request, as a well-behaved HTTP client does.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def _sockets(pid: int) -> int:
    """Sockets the server process holds open (its listening socket included)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return 0
    n = 0
    for fd in fds:
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


class Tally:
    """Thread-safe counters for one kind of client."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: dict[int | str, int] = {}
        self.latencies: list[float] = []
        self.order: list[int | str] = []  # the status of each latency, in the same order

    def add(self, status: int | str, latency: float | None = None) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if latency is not None:
                self.latencies.append(latency)
                self.order.append(status)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--image", type=Path, help="an image to send (default: a generated 320x240 JPEG)")
    ap.add_argument("--caption", default="a man riding a horse next to a parked car")
    ap.add_argument("--slowloris", type=int, default=0, help="connections that never finish their headers")
    ap.add_argument("--slow-body", type=int, default=0, help="connections that trickle a body")
    ap.add_argument("--trickle", type=float, default=1.0, help="seconds between a slow client's bytes")
    ap.add_argument("--timeouts", type=int, default=0, help="clients sending batches that time out")
    ap.add_argument("--batch", type=int, default=64, help="items per timing-out (or --batch-clients) batch")
    ap.add_argument("--batch-clients", default="",
                    help="goodput sweep: comma-separated counts of concurrent batch clients, e.g. 1,2,4,8")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `mmtag serve` argument, e.g. --server-arg=--timeout=2 (repeatable)")
    args = ap.parse_args()
    if args.image:
        image = args.image.read_bytes()
    else:
        buf = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG")
        image = buf.getvalue()

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mmtag")), "serve", str(args.run),
                               "--port", str(port), *args.server_arg],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() - t0 > 120:
            raise SystemExit("server did not start")
        time.sleep(0.2)
    startup = time.time() - t0
    if args.batch_clients:
        try:
            _goodput_sweep(args, url, image, [int(c) for c in args.batch_clients.split(",")], startup)
        finally:
            server.terminate()
            server.wait(timeout=30)
        return

    good, bad, slow, timing_out = Tally(), Tally(), Tally(), Tally()
    stop = time.time() + args.seconds
    peak = {"rss": 0.0, "sockets": 0}

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            n = 0
            while time.time() < stop:
                n += 1
                is_bad = n % 10 == 0
                files = {"image": ("x.jpg", b"not an image" if is_bad else image, "image/jpeg")}
                t = time.perf_counter()
                try:
                    r = c.post("/predict", files=files, data={"caption": args.caption})
                    status: int | str = r.status_code
                except httpx.HTTPError as exc:
                    status = exc.__class__.__name__
                (bad if is_bad else good).add(status, None if is_bad else time.perf_counter() - t)

    def slow_client(head: bytes) -> None:
        """Sends `head`, then a byte per --trickle s; counts how the server ends each connection."""
        while time.time() < stop:
            opened = time.time()
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                slow.add("could not connect")
                time.sleep(args.trickle)
                continue
            try:
                sock.sendall(head)
                while time.time() < stop:
                    time.sleep(args.trickle)
                    sock.sendall(b"a")
                sock.close()
                slow.add("held to the end")
            except OSError:
                sock.close()
                slow.add(f"closed by server after ~{5 * round((time.time() - opened) / 5)} s")

    def timeout_client() -> None:
        files = [("images", (f"{k}.jpg", image, "image/jpeg")) for k in range(args.batch)]
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    r = c.post("/predict/batch", files=files, data={"captions": [args.caption] * args.batch})
                    status: int | str = r.status_code
                except httpx.HTTPError as exc:
                    status = exc.__class__.__name__
                timing_out.add(status, time.perf_counter() - t)

    def watch() -> None:
        while time.time() < stop:
            peak["rss"] = max(peak["rss"], _rss_mib(server.pid))
            peak["sockets"] = max(peak["sockets"], _sockets(server.pid))
            time.sleep(0.5)

    loris = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
    body = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 20}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n").encode()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    threads += [threading.Thread(target=slow_client, args=(loris,), daemon=True)
                for _ in range(args.slowloris)]
    threads += [threading.Thread(target=slow_client, args=(body,), daemon=True)
                for _ in range(args.slow_body)]
    threads += [threading.Thread(target=timeout_client) for _ in range(args.timeouts)]
    threads.append(threading.Thread(target=watch))
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, stop - time.time()) + 130)
    elapsed = time.time() - start
    server.terminate()
    server.wait(timeout=30)

    lat = np.array(good.latencies or [float("nan")]) * 1000
    total = sum(good.statuses.values())
    fivexx = sum(v for s, v in good.statuses.items() if isinstance(s, int) and s >= 500)
    failed = sum(v for s, v in good.statuses.items() if isinstance(s, str))
    bad_4xx = sum(v for s, v in bad.statuses.items() if isinstance(s, int) and 400 <= s < 500)
    print(f"# mmtag serve load test: {args.run}, {args.clients} clients x {args.seconds:g} s, loopback"
          f"{' ' + ' '.join(args.server_arg) if args.server_arg else ''}")
    print(f"alongside: {args.slowloris} slowloris, {args.slow_body} slow-body, "
          f"{args.timeouts} timing-out ({args.batch}-item batches) clients; trickle {args.trickle:g} s")
    print(f"server startup {startup:.1f} s; {os.cpu_count()} CPUs")
    print("| well-behaved requests | req/s | p50 ms | p90 ms | p99 ms | 5xx | connection failures "
          "| bad requests answered 4xx | peak server RSS MiB | peak server sockets |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {total} | {total / elapsed:.1f} | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 90):.0f} | "
          f"{np.percentile(lat, 99):.0f} | {fivexx} | {failed} | "
          f"{bad_4xx}/{sum(bad.statuses.values())} | {peak['rss']:.0f} | {peak['sockets']} |")
    print(f"well-behaved status counts: {dict(sorted(good.statuses.items(), key=str))}")
    if args.timeouts:
        tl = np.array(timing_out.latencies) * 1000
        print(f"timing-out batches: {dict(sorted(timing_out.statuses.items(), key=str))}, "
              f"p50 {np.percentile(tl, 50):.0f} ms")
    if args.slowloris or args.slow_body:
        print(f"slow connections: {dict(sorted(slow.statuses.items(), key=str))}")


def _ms(seconds: list[float], q: float) -> str:
    return f"{np.percentile(np.array(seconds) * 1000, q):.0f}" if seconds else "–"


def _goodput_sweep(args: argparse.Namespace, url: str, image: bytes, levels: list[int],
                   startup: float) -> None:
    """For each level: that many batch clients and one single-item client for --seconds."""
    batch_files = [("images", (f"{k}.jpg", image, "image/jpeg")) for k in range(args.batch)]
    batch_data = {"captions": [args.caption] * args.batch}
    rows = []
    for level in levels:
        stop = time.time() + args.seconds
        tallies = {"batch": Tally(), "single": Tally()}

        def client(kind: str) -> None:
            with httpx.Client(base_url=url, timeout=300) as c:
                while time.time() < stop:
                    t = time.perf_counter()
                    try:
                        if kind == "batch":
                            r = c.post("/predict/batch", files=batch_files, data=batch_data)
                        else:
                            r = c.post("/predict", files={"image": ("x.jpg", image, "image/jpeg")},
                                       data={"caption": args.caption})
                        status: int | str = r.status_code
                    except httpx.HTTPError as exc:
                        r, status = None, exc.__class__.__name__
                    tallies[kind].add(status, time.perf_counter() - t)
                    if status == 503 and r is not None:
                        retry = float(r.headers.get("retry-after", "1"))
                        time.sleep(max(0.0, min(retry, stop - time.time())))

        threads = [threading.Thread(target=client, args=("batch",)) for _ in range(level)]
        threads.append(threading.Thread(target=client, args=("single",)))
        start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - start  # every request sent before the stop has been answered
        for kind, tally in tallies.items():
            rows.append((level, kind, tally, elapsed))

    print(f"# mmtag serve goodput: {args.run}, {args.batch}-item batches, {args.seconds:g} s per level, "
          f"loopback{' ' + ' '.join(args.server_arg) if args.server_arg else ''}")
    print(f"server startup {startup:.1f} s; {os.cpu_count()} CPUs")
    print("| batch clients | class | requests | 200 | 503 | 504 | other | goodput (200/s) "
          "| p50 ms (200s) | p99 ms (200s) | p99 ms (all) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for level, kind, tally, elapsed in rows:
        st = tally.statuses
        n = sum(st.values())
        ok = [lat for lat, s in zip(tally.latencies, tally.order) if s == 200]
        other = n - sum(st.get(s, 0) for s in (200, 503, 504))
        print(f"| {level} | {kind} | {n} | {st.get(200, 0)} | {st.get(503, 0)} | {st.get(504, 0)} | {other} "
              f"| {st.get(200, 0) / elapsed:.2f} | {_ms(ok, 50)} | {_ms(ok, 99)} | {_ms(tally.latencies, 99)} |")
    for level, kind, tally, _ in rows:
        odd = {s: v for s, v in tally.statuses.items() if s not in (200, 503, 504)}
        if odd:
            print(f"{level} batch clients, {kind}: other answers {odd}")


if __name__ == "__main__":
    main()
