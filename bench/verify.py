"""Benchmark of the verify_pairs flow on real LFW, images served by a local moto S3 server.

    nice .venv/bin/python bench/verify.py [--data-home ../shared/data] [--naive-sample 600]
        [--synthetic-pairs 1000000] [--synthetic-images 10000] [--model-dir DIR]

Part 1 -- the 6,000 View 2 pairs as one labelled list, end to end through the flow:
pairs/s, compared with (a) the decode-only bound: fetching and decoding the unique images
alone, on the same thread pool, and (b) a naive loop that fetches, preprocesses and embeds
both images of every pair one at a time with the same model (timed on a sample of pairs
and extrapolated; the output says so).

Part 2 -- a synthetic list of 1,000,000 pairs over 10,000 unique LFW images, run in a fresh
child process so its peak RSS (ru_maxrss) is the flow's own: peak RSS and time.

The model is the production model of the bench bucket: ``--model-dir`` (any model dir
``models.loading.load_embedder`` reads), else a PCA fitted here on View 1 DevTrain people
(it overlaps View 2 identities: the accuracy printed is not an honest View 2 figure, the
benchmark is about throughput).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402

from bench.moto import start_moto  # noqa: E402

BUCKET = "facereid-bench"


def lfw_path(root: Path, person: str, index: int) -> Path:
    return root / "lfw_funneled" / person / f"{person}_{index:04d}.jpg"


def image_key(person: str, index: int) -> str:
    return f"images/lfw/{person}/{person}_{index:04d}.jpg"


def read_view2(lfw_home: Path) -> list[tuple[str, int, str, int, int]]:
    lines = (lfw_home / "pairs.txt").read_text().splitlines()[1:]
    pairs = []
    for line in lines:
        f = line.split("\t")
        if len(f) == 3:
            pairs.append((f[0], int(f[1]), f[0], int(f[2]), 1))
        elif len(f) == 4:
            pairs.append((f[0], int(f[1]), f[2], int(f[3]), 0))
    return pairs


def upload_images(storage, root: Path, images: list[tuple[str, int]], workers: int = 16) -> float:
    start = time.perf_counter()
    existing = {i.key for i in storage.list("images/lfw/")}

    def put(img: tuple[str, int]) -> None:
        key = image_key(*img)
        if key not in existing:
            storage.put_bytes(key, lfw_path(root, *img).read_bytes(), "image/jpeg")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, images))
    return time.perf_counter() - start


def fit_bench_model(lfw_home: Path, out: Path, n_people: int = 400) -> Path:
    from models.evaluation import fit_threshold, score_pairs
    from models.loading import write_model_json
    from models.pca import PCAEmbedder
    from models.preprocessing import preprocess_image

    people = []
    for line in (lfw_home / "peopleDevTrain.txt").read_text().splitlines()[1:]:
        name, count = line.split("\t")
        if int(count) >= 3:
            people.append((name, int(count)))
    people = people[:n_people]
    faces, labels = [], []
    for label, (name, count) in enumerate(people):
        for i in range(1, min(count, 6) + 1):
            faces.append(preprocess_image(lfw_path(lfw_home, name, i).read_bytes()))
            labels.append(label)
    x, y = np.stack(faces), np.array(labels)
    model = PCAEmbedder(n_components=150, lda=True).fit(x, y)
    emb = model.embed(x)
    ia, ib = np.triu_indices(len(y), 1)
    same = y[ia] == y[ib]
    neg = np.random.default_rng(0).choice(np.flatnonzero(~same), int(same.sum()), replace=False)
    keep = np.concatenate([np.flatnonzero(same), neg])
    threshold = fit_threshold(score_pairs(emb[ia[keep]], emb[ib[keep]]), same[keep])
    model.save(out)
    write_model_json(out, "pca", threshold, model.embedding_dim_, model.get_params())
    return out


def untrained_siamese(out: Path) -> Path:
    from models.loading import write_model_json
    from models.siamese import SiameseConfig, SiameseEmbedder, build_inference_model, build_tower

    config = SiameseConfig()
    SiameseEmbedder(build_inference_model(build_tower(config)), config).save(out)
    write_model_json(out, "siamese", 0.5, config.embedding_dim, config.to_dict())
    return out


def promote(storage, model_dir: Path) -> dict:
    from core.registry import promote_if_better, register_version

    version = register_version(storage, "bench", model_dir, {"test": {"accuracy": 1.0}}, {})
    return promote_if_better(storage, "bench", version)["pointer"]


def decode_bound(storage, keys: list[str], workers: int) -> float:
    """Fetch + full decode (PIL, grayscale) of every unique image, same pool size."""
    from PIL import Image

    def work(key: str) -> int:
        with Image.open(io.BytesIO(storage.get_bytes(key))) as img:
            return img.convert("L").size[0]

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, keys))
    return time.perf_counter() - start


def naive_loop(storage, embedder, pairs, sample: int) -> tuple[float, int]:
    """Per pair: fetch both, preprocess both, embed each alone, score. Returns (s, n)."""
    from models.preprocessing import preprocess_image

    todo = pairs[:sample]
    embedder.embed(preprocess_image(storage.get_bytes(image_key(*todo[0][:2]))))  # warm-up
    start = time.perf_counter()
    for pa_, ia_, pb_, ib_, _ in todo:
        ea = embedder.embed(preprocess_image(storage.get_bytes(image_key(pa_, ia_))))
        eb = embedder.embed(preprocess_image(storage.get_bytes(image_key(pb_, ib_))))
        float((ea * eb).sum())
    return time.perf_counter() - start, len(todo)


def run_flow(
    storage, list_key: str, workers: int, batch: int, precision: str = "float32"
) -> tuple[dict, float]:
    from flows.verify_pairs import verify_pairs

    start = time.perf_counter()
    out = verify_pairs(
        list_key=list_key,
        model_name="bench",
        max_concurrency=workers,
        batch_size=batch,
        precision=precision,
    )
    return out, time.perf_counter() - start


def configure(endpoint: str, cache: Path) -> object:
    os.environ["FACEREID_STORAGE_URI"] = f"s3://{BUCKET}/bench"
    os.environ["FACEREID_S3_ENDPOINT_URL"] = endpoint
    os.environ["FACEREID_CACHE_DIR"] = str(cache)
    os.environ["FACEREID_VERIFY_ALLOWED_PREFIXES"] = '["images/"]'
    from core.settings import get_settings
    from core.storage import get_storage

    get_settings.cache_clear()
    return get_storage(get_settings())


def part_view2(args, storage, lfw_home: Path, model_dir: Path) -> dict:
    from models.loading import load_embedder

    pairs = read_view2(lfw_home)
    unique = sorted(
        {(p, i) for pa_, ia_, pb_, ib_, _ in pairs for p, i in ((pa_, ia_), (pb_, ib_))}
    )
    print(f"[view2] {len(pairs)} pairs over {len(unique)} unique images")
    rows = ["pair_id,image_a,image_b,label"] + [
        f"v2-{n},{image_key(a, ia_)},{image_key(b, ib_)},{lab}"
        for n, (a, ia_, b, ib_, lab) in enumerate(pairs)
    ]
    body = ("\n".join(rows) + "\n").encode()
    runs = {}
    for precision in args.precision.split(","):  # one list key each: the ledger skips repeats
        key = f"incoming/view2-{precision}.csv"
        storage.put_bytes(key, body, "text/csv")
        out, seconds = run_flow(
            storage, key, args.max_concurrency, args.batch_size, precision=precision
        )
        runs[precision] = (out["processed"][0], seconds)
    keys = [image_key(*img) for img in unique]
    decode = decode_bound(storage, keys, args.max_concurrency)
    res: dict = {
        "pairs": len(pairs),
        "unique_images": len(unique),
        "decode_bound_seconds": round(decode, 2),
    }
    for precision, (entry, seconds) in runs.items():
        m = entry["metrics"]
        embedder = load_embedder(model_dir, precision=precision)  # the naive loop's model
        naive_s, naive_n = naive_loop(storage, embedder, pairs, args.naive_sample)
        naive_total = naive_s * len(pairs) / naive_n
        res[precision] = {
            "naive_sample_pairs": naive_n,
            "naive_sample_seconds": round(naive_s, 2),
            "naive_extrapolated_seconds": round(naive_total, 1),
            "flow_seconds": round(seconds, 2),
            "list_seconds": entry["seconds"],
            "pairs_per_s": round(len(pairs) / seconds, 1),
            "ratio_to_decode_bound": round(seconds / decode, 2),
            "ratio_list_to_decode_bound": round(entry["seconds"] / decode, 2),
            "speedup_vs_naive": round(naive_total / seconds, 1),
            "accuracy": m.get("accuracy"),
            "roc_auc": m.get("roc_auc"),
            "status_counts": m["status_counts"],
        }
    print("[view2] " + json.dumps(res))
    return res


def synthetic_child(args) -> None:
    """Runs in a fresh process: 1M pairs over N unique images; prints its own peak RSS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage = configure(args.endpoint, Path(args.cache))
    keys = [i.key for i in storage.list("images/lfw/")][: args.synthetic_images]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.parquet"
        karr = np.array(keys, dtype=object)
        with pq.ParquetWriter(
            path,
            pa.schema(
                [("pair_id", pa.string()), ("image_a", pa.string()), ("image_b", pa.string())]
            ),
        ) as writer:
            step = 100_000
            for start in range(0, args.synthetic_pairs, step):
                n = min(step, args.synthetic_pairs - start)
                a = rng.integers(0, len(keys), n)
                b = rng.integers(0, len(keys), n)
                writer.write_table(
                    pa.table(
                        {
                            "pair_id": [f"s{start + i}" for i in range(n)],
                            "image_a": karr[a].tolist(),
                            "image_b": karr[b].tolist(),
                        }
                    ),
                    row_group_size=50_000,
                )
        from tasks.verify import publish_file

        publish_file(storage, "incoming/synthetic.parquet", path, "application/vnd.apache.parquet")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out, seconds = run_flow(
            storage, "incoming/synthetic.parquet", args.max_concurrency, args.batch_size
        )
    entry = out["processed"][0]
    res = {
        "pairs": args.synthetic_pairs,
        "unique_images": entry["metrics"]["unique_images"],
        "flow_seconds": round(seconds, 1),
        "pairs_per_s": round(args.synthetic_pairs / seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_flow_mb": round(rss_before / 1024, 1),
        "status_counts": entry["metrics"]["status_counts"],
    }
    print("SYNTHETIC " + json.dumps(res), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-home", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--model-dir", default=None)
    p.add_argument(
        "--siamese-untrained",
        action="store_true",
        help="use a randomly initialised Siamese net of the production architecture "
        "(throughput only: its accuracy means nothing)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="Siamese inference precision(s) for the View 2 flow run, e.g. float32,bfloat16 "
        "(each its own flow run and naive loop in this process)",
    )
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--naive-sample", type=int, default=600)
    p.add_argument("--synthetic-pairs", type=int, default=1_000_000)
    p.add_argument("--synthetic-images", type=int, default=10_000)
    p.add_argument("--skip-view2", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--child-synthetic", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_synthetic:
        synthetic_child(args)
        return 0

    lfw_home = Path(args.data_home) / "lfw_home"
    if not (lfw_home / "pairs.txt").exists():
        print(f"no LFW copy at {lfw_home}", file=sys.stderr)
        return 2
    moto, endpoint = start_moto()
    results: dict = {"cpus": os.cpu_count()}
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            storage = configure(endpoint, cache)
            if args.model_dir:
                model_dir = Path(args.model_dir)
            elif args.siamese_untrained:
                model_dir = untrained_siamese(Path(tmp) / "model")
            else:
                model_dir = fit_bench_model(lfw_home, Path(tmp) / "model")
            pointer = promote(storage, model_dir)
            print(
                f"[setup] model {pointer['name']} {pointer['version']} "
                f"threshold {pointer['threshold']:.4f}"
            )
            view2 = read_view2(lfw_home)
            images = sorted(
                {(p_, i_) for a, ia_, b, ib_, _ in view2 for p_, i_ in ((a, ia_), (b, ib_))}
            )
            if not args.skip_synthetic:
                everything = sorted(
                    (d.name, int(f.stem.rsplit("_", 1)[1]))
                    for d in (lfw_home / "lfw_funneled").iterdir()
                    if d.is_dir()
                    for f in d.glob("*.jpg")
                )
                extra = [x for x in everything if x not in set(images)]
                images = images + extra[: max(0, args.synthetic_images - len(images))]
            up = upload_images(storage, lfw_home, images)
            print(f"[setup] uploaded {len(images)} LFW images to moto in {up:.1f}s")
            if not args.skip_view2:
                from prefect.testing.utilities import prefect_test_harness

                with prefect_test_harness(server_startup_timeout=120):
                    results["view2"] = part_view2(args, storage, lfw_home, model_dir)
            if not args.skip_synthetic:
                child = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child-synthetic",
                        "--endpoint",
                        endpoint,
                        "--cache",
                        str(cache),
                        "--synthetic-pairs",
                        str(args.synthetic_pairs),
                        "--synthetic-images",
                        str(args.synthetic_images),
                        "--max-concurrency",
                        str(args.max_concurrency),
                        "--batch-size",
                        str(args.batch_size),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                line = [x for x in child.stdout.splitlines() if x.startswith("SYNTHETIC ")]
                if child.returncode or not line:
                    print(child.stdout[-3000:], child.stderr[-3000:], file=sys.stderr)
                    raise RuntimeError(f"synthetic child failed ({child.returncode})")
                results["synthetic"] = json.loads(line[0][len("SYNTHETIC ") :])
                print("[synthetic] " + json.dumps(results["synthetic"]))
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
