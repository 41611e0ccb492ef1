"""Issue-7 benchmark: a bounded loopback load test of `mmtag serve`.

    .venv/bin/python bench/serve_load.py --run RUN [--clients 4] [--seconds 60] [--image a.jpg]

Starts `mmtag serve RUN` on a free loopback port, lets CLIENTS threads post /predict (one image +
caption each, plus one bad request in ten, which must get a 4xx) for SECONDS, then stops the server
and prints requests/s, latency percentiles, status counts and the server's peak resident memory.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--image", type=Path, help="an image to send (default: a generated 320x240 JPEG)")
    ap.add_argument("--caption", default="a man riding a horse next to a parked car")
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
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    bad_ok: list[bool] = []
    lock = threading.Lock()
    stop = time.time() + args.seconds
    peak = [0.0]

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            n = 0
            while time.time() < stop:
                n += 1
                bad = n % 10 == 0
                files = {"image": ("x.jpg", b"not an image" if bad else image, "image/jpeg")}
                t = time.perf_counter()
                r = c.post("/predict", files=files, data={"caption": args.caption})
                dt = time.perf_counter() - t
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if bad:
                        bad_ok.append(400 <= r.status_code < 500)
                    else:
                        latencies.append(dt)

    def watch() -> None:
        while time.time() < stop:
            peak[0] = max(peak[0], _rss_mib(server.pid))
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    threads.append(threading.Thread(target=watch))
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - start
    server.terminate()
    server.wait(timeout=30)

    lat = np.array(latencies) * 1000
    total = sum(statuses.values())
    print(f"# mmtag serve load test: {args.run}, {args.clients} clients x {args.seconds:g} s, loopback")
    print(f"server startup {startup:.1f} s; {os.cpu_count()} CPUs")
    print("| requests | req/s | p50 ms | p90 ms | p99 ms | 5xx | bad requests answered 4xx | peak server RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {total} | {total / elapsed:.1f} | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 90):.0f} | "
          f"{np.percentile(lat, 99):.0f} | {sum(v for s, v in statuses.items() if s >= 500)} | "
          f"{sum(bad_ok)}/{len(bad_ok)} | {peak[0]:.0f} |")
    print(f"status counts: {dict(sorted(statuses.items()))}")


if __name__ == "__main__":
    main()
