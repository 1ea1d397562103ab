"""Load on the world gateway: N concurrent HTTP clients against Serve on 127.0.0.1, then an episode audit.

Starts Ray and Serve (loopback only), deploys serve_apps.world_gateway with a temporary root, creates W worlds
(the offline world template, tiny preset, 32x32, 2 denoising steps) and runs `--clients` threads for
`--seconds` (or until `--requests` in all). Each client picks requests at random: step a world (POST, a share
`--step-share`, default 0.2), else read its state, its info, a page of its episodes, or one of its PNGs. Prints requests/s, p50/p99
latency overall and per request kind, and errors (any non-2xx or transport failure). Afterwards every world is
audited: its episode folders are numbered 1..E with distinct state ids (no duplicate), and E equals the number
of successful step responses that reported a saved episode (none lost).

    .venv/bin/python bench/serve_load.py [--clients 8] [--worlds 4] [--seconds 20] [--requests 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import ray
import requests
from ray import serve

from serve_apps.world_gateway import app_builder
from worldgen.storage import WorldStorage

READS = {"state": 1, "info": 1, "episodes": 1.5, "png": 0.5}  # relative weights among the reads
WORLD = {"template": "offline_world", "params": {"preset": "tiny", "size": 32, "steps": 2}}
MAX_CLIENTS, MAX_SECONDS = 64, 300


class Load:
    """The shared record of every request: kind, latency, status; and the episodes steps reported (warm-up
    steps included)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.saved: dict[str, list[int]] = defaultdict(list)  # world -> episode numbers steps reported
        self.sent = 0

    def take(self, limit: int) -> bool:
        with self.lock:
            self.sent += 1
            return self.sent <= limit

    def record(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latency[kind].append(seconds)
            if error:
                self.errors[kind].append(error)


def client(
    base: str, worlds: list[str], load: Load, until: float, limit: int, seed: int, step_share: float
) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    reads = sum(READS.values())
    kinds = ["step", *READS]
    weights = [step_share, *((1 - step_share) * w / reads for w in READS.values())]
    while time.monotonic() < until and load.take(limit):
        kind, world = rng.choices(kinds, weights)[0], rng.choice(worlds)
        url = f"{base}/v1/worlds/{world}"
        start, error = time.perf_counter(), None
        try:
            if kind == "step":
                response = session.post(url + "/step", json={}, timeout=600)
            elif kind == "png":
                page = session.get(url + "/episodes", params={"limit": 1}, timeout=60).json()
                items = page.get("items") or []
                if not items:
                    continue  # nothing to fetch yet: not a request of this kind
                start = time.perf_counter()
                response = session.get(base + items[0]["state"]["artifacts"][0]["url"], timeout=60)
            else:
                path = {"state": "/state", "info": "", "episodes": "/episodes"}[kind]
                params = {"offset": rng.randrange(0, 3), "limit": 5} if kind == "episodes" else None
                response = session.get(url + path, params=params, timeout=60)
            if response.status_code >= 300:
                error = f"{response.status_code}: {response.text[:200]}"
            elif kind == "step" and response.json().get("episode") is not None:
                with load.lock:
                    load.saved[world].append(response.json()["episode"])
        except requests.RequestException as err:
            error = f"{type(err).__name__}: {err}"
        load.record(kind, time.perf_counter() - start, error)


def audit(root: Path, world: str, reported: list[int]) -> str | None:
    """None when the world's episodes are exactly the ones its steps reported, else what is wrong."""
    storage = WorldStorage(root / world)
    numbers = storage.episodes()
    ids = [storage.load_episode(n)[0].id for n in numbers]
    if numbers != list(range(1, len(numbers) + 1)):
        return f"episode folders not numbered 1..{len(numbers)}: {numbers}"
    if len(set(ids)) != len(ids):
        return "a state was saved twice"
    if sorted(reported) != numbers:
        return f"steps reported episodes {sorted(reported)}, folders hold {numbers}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--worlds", type=int, default=4, help="worlds the clients share")
    parser.add_argument(
        "--seconds", type=float, default=20, help=f"how long to drive load (at most {MAX_SECONDS})"
    )
    parser.add_argument("--requests", type=int, default=5000, help="stop after this many requests in all")
    parser.add_argument("--step-share", type=float, default=0.2, help="share of requests that step a world")
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout (the table to stderr)")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS or args.worlds < 1:
        parser.error(f"--clients 1..{MAX_CLIENTS}, --seconds up to {MAX_SECONDS}, --worlds >= 1")
    if not 0 <= args.step_share <= 1:
        parser.error("--step-share is a fraction, 0..1")
    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    root = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        ray.init(num_cpus=2, logging_level="warning")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})  # loopback only
        serve.run(app_builder({"root": str(root)}), name="load", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        worlds, load = [f"w{i}" for i in range(args.worlds)], Load()
        for world in worlds:  # two warm-up steps: the second saves an episode, so there are PNGs to read
            response = requests.post(base + "/v1/worlds", json={"id": world, **WORLD}, timeout=300)
            response.raise_for_status()
            for _ in range(2):
                report = requests.post(f"{base}/v1/worlds/{world}/step", json={}, timeout=600)
                report.raise_for_status()
                if report.json()["episode"] is not None:
                    load.saved[world].append(report.json()["episode"])
        print(f"world gateway on {base}: {args.worlds} worlds, {args.clients} clients, {args.step_share:.0%} steps, "
              f"{args.seconds:g} s or {args.requests} requests (ray {ray.__version__})")  # fmt: skip
        until = time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=client, args=(base, worlds, load, until, args.requests, i, args.step_share)
            )
            for i in range(args.clients)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        everything = [s for values in load.latency.values() for s in values]
        errors = sum(len(e) for e in load.errors.values())
        print(f"\n{len(everything)} requests in {elapsed:.1f} s = {len(everything) / elapsed:.1f} requests/s, "
              f"p50 {percentile(everything, 0.5):.1f} ms, p99 {percentile(everything, 0.99):.1f} ms, "
              f"errors {errors}")  # fmt: skip
        print(f"  {'kind':9s} {'count':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s}")
        for kind, values in sorted(load.latency.items()):
            print(f"  {kind:9s} {len(values):6d} {percentile(values, 0.5):8.1f} {percentile(values, 0.99):8.1f} "
                  f"{len(load.errors[kind]):6d}")  # fmt: skip
        for kind, messages in load.errors.items():
            for message in sorted(set(messages))[:3]:
                print(f"  error ({kind}): {message}")
        problems = {w: p for w in worlds if (p := audit(root, w, load.saved[w]))}
        steps = {w: requests.get(f"{base}/v1/worlds/{w}", timeout=60).json()["step"] for w in worlds}
        print(f"\nepisode audit: {sum(steps.values())} steps, "
              f"{sum(len(load.saved[w]) for w in worlds)} episodes saved, "
              + ("no lost or duplicated episode" if not problems else f"PROBLEMS: {problems}"))  # fmt: skip
        if args.json:
            sys.stdout = real_stdout
            print(json.dumps({
                "clients": args.clients, "worlds": args.worlds, "step_share": args.step_share, "seconds": elapsed, "requests": len(everything),
                "requests_per_s": len(everything) / elapsed, "p50_ms": percentile(everything, 0.5),
                "p99_ms": percentile(everything, 0.99), "errors": errors,
                "per_kind": {k: {"count": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99),
                                 "errors": len(load.errors[k])} for k, v in load.latency.items()},
                "audit_problems": problems,
            }, indent=2))  # fmt: skip
        return 0 if not problems and not errors else 1
    finally:
        try:
            for world in worlds if "worlds" in locals() else []:
                requests.delete(f"{base}/v1/worlds/{world}", timeout=60)
            serve.shutdown()
            ray.shutdown()
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
