"""How fast can anything GET small objects from the moto S3 server on this machine?

    nice .venv/bin/python bench/s3_get.py [--images 2000] [--workers 16]

Uploads LFW JPEGs to a fresh moto server, then times fetching every one of them with
boto3 one at a time (what the naive loop in bench/verify.py does), boto3 on a thread pool
(what the verify flow does), pyarrow's C++ S3 filesystem, and a bare unsigned HTTP GET
(urllib3: the least client work possible). Prints wall time and this process's CPU time
per object, and each ratio to the sequential boto3 run. When every client lands near the
same wall time per object, the server, not the client, is the bottleneck: that bounds the
speed-up any verify design can show over a naive loop with images served this way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.moto import start_moto  # noqa: E402
from bench.verify import BUCKET  # noqa: E402  (also sets the moto credentials)


def timed(keys: list[str], fetch: Callable[[str], bytes], workers: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) to fetch every key."""
    cpu0, wall0 = os.times(), time.perf_counter()
    if workers == 1:
        for key in keys:
            fetch(key)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fetch, keys))
    cpu1, wall = os.times(), time.perf_counter() - wall0
    return wall, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-home", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=16)
    args = p.parse_args()
    import boto3
    import pyarrow.fs as pafs
    import urllib3
    from botocore.config import Config

    files = sorted((Path(args.data_home) / "lfw_home" / "lfw_funneled").glob("*/*.jpg"))
    files = files[: args.images]
    if not files:
        print(f"no LFW images under {args.data_home}", file=sys.stderr)
        return 2
    moto, endpoint = start_moto()
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(max_pool_connections=2 * args.workers),
        )
        s3.create_bucket(Bucket=BUCKET)
        keys = [f"images/{f.name}" for f in files]
        with ThreadPoolExecutor(args.workers) as pool:
            list(
                pool.map(
                    lambda kf: s3.put_object(Bucket=BUCKET, Key=kf[0], Body=kf[1].read_bytes()),
                    zip(keys, files, strict=True),
                )
            )
        arrow = pafs.S3FileSystem(
            endpoint_override=endpoint,
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            scheme="http",
        )
        http = urllib3.PoolManager(maxsize=2 * args.workers)

        def boto_get(key: str) -> bytes:
            return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

        def arrow_get(key: str) -> bytes:
            with arrow.open_input_stream(f"{BUCKET}/{key}") as fh:
                return fh.read()

        def http_get(key: str) -> bytes:
            return http.request("GET", f"{endpoint}/{BUCKET}/{key}").data

        runs = [
            ("boto3, one at a time", boto_get, 1),
            (f"boto3, {args.workers} threads", boto_get, args.workers),
            (f"pyarrow S3FileSystem, {args.workers} threads", arrow_get, args.workers),
            (f"unsigned urllib3 GET, {args.workers} threads", http_get, args.workers),
        ]
        base = None
        print(f"{len(keys)} objects, mean {sum(f.stat().st_size for f in files) // len(files)} B")
        for name, fetch, workers in runs:
            wall, cpu = timed(keys, fetch, workers)
            base = base or wall
            print(
                f"{name}: {wall:.2f} s, {1000 * wall / len(keys):.2f} ms/object wall, "
                f"{1000 * cpu / len(keys):.2f} ms/object client CPU, "
                f"{base / wall:.2f}x the sequential boto3 speed",
                flush=True,
            )
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
