"""Benchmark: the ``ingest_lfw`` flow on the full LFW vs scikit-learn's own loader.

Measures, in one process and one run:

1. ``sklearn.datasets.fetch_lfw_people(min_faces_per_person=0, resize=0.5)`` with an
   EMPTY joblib cache (a fresh writable data_home whose ``lfw_home/`` entries symlink to
   the read-only copy), i.e. sklearn's cold load of the same 13,233 images;
2. the real ``ingest_lfw`` flow (Prefect engine, tasks, artifacts, spawn pool) into a
   local storage root;
3. the same flow into a moto S3 server this script starts on 127.0.0.1.

The flow itself is timed (``ingest_lfw(...)``: Prefect engine, task runs, artifacts and
the spawn pool included), each time into an empty store so the full work is done; the
re-run ("already ingested") time is printed too.

The page cache is warmed once before timing so neither side pays for the first disk read.
Prefect's temporary API server is started (and warmed with a trivial flow) before timing:
server start-up is not ingest work.

    nice .venv/bin/python bench/ingest.py [--data-home ../shared/data] [--targets local,s3]
        [--repeat 3]

Rounds are interleaved (sklearn, local, s3, sklearn, ...) and medians reported, because
on a shared machine one measurement says more about the neighbours than about the code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.moto import start_moto  # noqa: E402


def warm_page_cache(lfw_home: Path) -> int:
    n = 0
    for path in (lfw_home / "lfw_funneled").glob("*/*.jpg"):
        path.read_bytes()
        n += 1
    return n


def sklearn_cold_load(lfw_home: Path, scratch: Path) -> tuple[float, int]:
    """fetch_lfw_people with an empty joblib cache, on symlinks to the shared files."""
    from sklearn.datasets import fetch_lfw_people

    data_home = scratch / "sk_data"
    (data_home / "lfw_home").mkdir(parents=True)  # fresh: joblib cache starts empty
    for entry in lfw_home.iterdir():
        if entry.name != "joblib":
            (data_home / "lfw_home" / entry.name).symlink_to(entry)
    t0 = time.perf_counter()
    bunch = fetch_lfw_people(
        data_home=str(data_home), min_faces_per_person=0, resize=0.5, download_if_missing=False
    )
    elapsed = time.perf_counter() - t0
    return elapsed, int(bunch.images.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-home", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--targets", default="local,s3")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (load noise)")
    args = parser.parse_args()
    lfw_home = Path(args.data_home).resolve() / "lfw_home"
    targets = [t for t in args.targets.split(",") if t]

    scratch = Path(tempfile.mkdtemp(prefix="facereid-bench-"))
    os.environ.update(
        {
            "PREFECT_HOME": str(scratch / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FACEREID_CACHE_DIR": str(scratch / "cache"),
        }
    )
    moto = None
    rows: list[tuple[int, str, float]] = []  # (round, what, seconds)
    try:
        n_files = warm_page_cache(lfw_home)
        print(f"LFW: {lfw_home} ({n_files} JPEGs, page cache warmed)")

        from prefect import flow
        from prefect.testing.utilities import prefect_test_harness

        from core.settings import get_settings
        from flows.ingest_lfw import ingest_lfw

        @flow
        def warm_up() -> None:
            return None

        with prefect_test_harness(server_startup_timeout=180):
            warm_up()
            for rnd in range(args.repeat):
                sk_s, sk_n = sklearn_cold_load(lfw_home, scratch / f"round{rnd}")
                rows.append((rnd, "sklearn", sk_s))
                print(
                    f"[round {rnd}] sklearn fetch_lfw_people (empty joblib cache): {sk_n} images "
                    f"in {sk_s:.2f} s = {sk_n / sk_s:.0f} images/s",
                    flush=True,
                )
                for target in targets:
                    if target == "local":
                        uri = f"file://{scratch / f'round{rnd}' / 'store'}"
                        os.environ.pop("FACEREID_S3_ENDPOINT_URL", None)
                    elif target == "s3":
                        import boto3

                        moto, endpoint = start_moto()
                        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
                        os.environ["FACEREID_S3_ENDPOINT_URL"] = endpoint
                        uri = "s3://bench/facereid"
                    else:
                        raise SystemExit(f"unknown target {target!r}")
                    get_settings.cache_clear()
                    t0 = time.perf_counter()
                    result = ingest_lfw(data_home=str(lfw_home.parent), storage_uri=uri)
                    took = time.perf_counter() - t0
                    rows.append((rnd, target, took))
                    n = result["counts"]["images"]
                    t1 = time.perf_counter()
                    again = ingest_lfw(data_home=str(lfw_home.parent), storage_uri=uri)
                    rerun = time.perf_counter() - t1
                    print(
                        f"[round {rnd}] ingest_lfw flow -> {target} ({uri}): {n} images in "
                        f"{took:.2f} s = {n / took:.0f} images/s; ratio to sklearn = "
                        f"{took / sk_s:.2f}x; status={result['status']} "
                        f"version={result['version']}; re-run: {again['status']} in {rerun:.2f} s",
                        flush=True,
                    )
                    if moto is not None:
                        moto.terminate()
                        moto.wait(timeout=10)
                        moto = None
                shutil.rmtree(scratch / f"round{rnd}", ignore_errors=True)
        print("\nsummary (median over rounds; target: ingest <= 1.2x sklearn)")
        sk_med = statistics.median(s for _, w, s in rows if w == "sklearn")
        print(f"  sklearn fetch_lfw_people: {sk_med:.2f} s ({n_files / sk_med:.0f} images/s)")
        for target in targets:
            times = [s for _, w, s in rows if w == target]
            ratios = [
                s / next(x for r2, w2, x in rows if r2 == r and w2 == "sklearn")
                for r, w, s in rows
                if w == target
            ]
            med = statistics.median(times)
            print(
                f"  ingest_lfw -> {target}: {med:.2f} s ({n_files / med:.0f} images/s); "
                f"ratio median {statistics.median(ratios):.2f}x, per round "
                + ", ".join(f"{r:.2f}x" for r in ratios)
            )
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
