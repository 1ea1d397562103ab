"""A world step with its root on local disk vs on an S3-compatible store (moto's server, started here on 127.0.0.1).

The world of bench/world_step.py (default world, stages with no model work: `image/solid` creator), on the local
executor, two copies stepping in turns: one in a temp directory, one on `s3://.../world` through pyarrow.fs (every
write a PUT, every episode committed by one more PUT). Prints the median step and the time inside WorldStorage per
step, and the ratio store/local. A real store is farther away than 127.0.0.1: this measures the requests a step
makes and what they cost at ~1 ms each, not a cloud's latency (`requests per step` says how many it makes).

    .venv/bin/python bench/world_storage.py [--repeats 10] [--warmup 2] [--endpoint HOST:PORT]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from world_step import STORAGE, Counter, timed_step, world_config

from worldgen.stores import Store
from worldgen.world import World

STORE_CALLS = [(Store, m) for m in ("put", "get", "list", "exists", "size", "delete")]


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://{endpoint}/", timeout=1).close()
            return process, endpoint
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("moto's S3 server did not start (pip install 'moto[server]')")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per world first (at least 2)")
    parser.add_argument("--endpoint", help="an S3-compatible server HOST:PORT to use instead of moto")
    args = parser.parse_args(argv)
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(name, value)
    tmp = Path(tempfile.mkdtemp(prefix="world_storage_"))
    os.environ["WORLDGEN_CACHE_DIR"] = str(tmp / "cache")
    process, endpoint = (None, args.endpoint) if args.endpoint else start_moto()
    try:
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(
            "bench"
        )
        roots = {"local": tmp / "local", "s3": f"s3://bench/world?endpoint_override={endpoint}&scheme=http"}
        worlds = {side: World.from_config(world_config("local"), root) for side, root in roots.items()}
        for _ in range(max(args.warmup, 2)):
            for world in worlds.values():
                world.step()
        times: dict[str, list[float]] = {side: [] for side in roots}
        stored: dict[str, list[float]] = {side: [] for side in roots}
        with Counter(STORE_CALLS) as requests:
            timed_step(worlds["s3"])
        timed_step(worlds["local"])
        for i in range(args.repeats):
            for side in list(roots)[i % 2 :] + list(roots)[: i % 2]:
                with Counter(STORAGE) as storage:
                    times[side].append(timed_step(worlds[side]))
                stored[side].append(storage.seconds)
        step = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        store = {k: statistics.median(v) * 1e3 for k, v in stored.items()}
        print(f"World step, local executor, {args.repeats} interleaved steps per root (median ms):")
        print(f"  {'root':6s} {'step':>8s} {'storage':>8s}")
        for side in roots:
            print(f"  {side:6s} {step[side]:8.2f} {store[side]:8.2f}")
        total = sum(requests.counts.values())
        print(
            f"  requests per step on the store: {total} ({', '.join(f'{k} {v}' for k, v in sorted(requests.counts.items()))})"
        )
        print(f"\nstep on s3 / step on local disk = {step['s3'] / step['local']:.2f}")
        return 0
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
