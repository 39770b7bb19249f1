"""Verify pair lists: plain functions that do the work, thin @task wrappers for the flow.

Pipeline for one list (all streaming; see ``verify_list``):

1. download the list to a temp file and parse it once (``scan_pair_list``): validation,
   and the set of *unique* fetchable image references -- a PairListError rejects the list;
2. load each unique image once on a bounded thread pool, preprocess it with the shared
   :func:`models.preprocessing.preprocess_image` and embed in batches
   (``embed_unique_images``; the SageMaker backend swaps only the embedding step);
3. parse the list again chunk by chunk, score every pair from the embedding table with
   numpy and append the chunk to local Parquet and CSV writers (``score_pair_list``);
4. publish both files (``publish_results``), then write the ledger entry.

Only the unique-image -> embedding table (10,000 x D floats for the benchmark) and one
chunk of rows are in memory at a time; decoded images live only until their batch is
embedded. The run id is a hash of list key + ETag + model version, so a re-run after a
crash writes the very same result keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.image_refs import ImageRef, RefResolver
from core.ledger import ListVersionGone, record_processed, reject_list
from core.pairlists import NO_LABEL, PairChunk, iter_pair_chunks, list_format, list_stem
from core.storage import (
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    ObjectUnreadable,
    StorageError,
)

log = logging.getLogger(__name__)

STATUSES = ("ok", "missing_image", "unreadable_image", "no_face", "invalid_row", "forbidden")
RESULT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("image_a", pa.string()),
        ("image_b", pa.string()),
        ("score", pa.float32()),
        ("threshold", pa.float32()),
        ("same_person", pa.bool_()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
LABELLED_SCHEMA = RESULT_SCHEMA.append(pa.field("label", pa.int8()))


# ----------------------------------------------------------------------------- model


def find_production_pointers(storage: Any) -> list[dict[str, Any]]:
    """Every ``models/<name>/production.json`` pointer in storage."""
    from core.registry import get_production

    names = sorted(
        {
            key.split("/")[1]
            for key in storage.list_keys("models/")
            if key.count("/") == 2 and key.endswith("/production.json")
        }
    )
    return [p for p in (get_production(storage, n) for n in names) if p is not None]


def choose_model_name(storage: Any, model_name: str) -> str:
    """``auto`` = the promoted model with the best gate figure (ties: name order)."""
    from core.registry import RegistryError

    if model_name != "auto":
        return model_name
    pointers = find_production_pointers(storage)
    if not pointers:
        raise RegistryError(f"no promoted model under {storage.url_for('models/')}; run retrain")
    best = max(pointers, key=lambda p: (float(p.get("gate_value") or 0.0), p["name"]))
    return str(best["name"])


def load_model(
    storage: Any, model_name: str, cache_dir: str | Path, precision: str = "float32"
) -> tuple[dict, Any]:
    """``(pointer, embedder)`` of the production model (``auto`` picks the best one)."""
    from core.registry import load_production_model

    name = choose_model_name(storage, model_name)
    return load_production_model(storage, name, cache_dir, precision=precision)


def check_list_key(list_key: str) -> str:
    """A list to verify must be a pair list under incoming/ (not results/, models/, ...)."""
    from core.ledger import INCOMING
    from core.pairlists import is_pair_list

    if not list_key.startswith(INCOMING) or not is_pair_list(list_key):
        raise ValueError(f"list_key must be a .csv/.parquet key under incoming/: {list_key!r}")
    return list_key


def make_run_id(list_key: str, etag: str, model_name: str, model_version: str) -> str:
    """Deterministic: the same list version verified by the same model -> the same id."""
    digest = hashlib.sha256(f"{list_key}\n{etag}\n{model_name}\n{model_version}".encode())
    return digest.hexdigest()[:16]


class EmbeddingInProgress(Exception):
    """Another run is embedding the same images right now (a remote backend's job): this
    run leaves the list to the next one instead of disturbing that job's files."""


@dataclass(frozen=True)
class ListJob:
    """One list version to verify and where its results go."""

    info: ObjectInfo
    run_id: str
    model_name: str
    model_version: str

    @property
    def stem(self) -> str:
        return list_stem(self.info.key)

    @property
    def result_key(self) -> str:
        return f"results/{self.stem}/{self.run_id}.parquet"

    @property
    def csv_key(self) -> str:
        return f"results/{self.stem}/{self.run_id}.csv"


def make_job(info: ObjectInfo, pointer: dict[str, Any]) -> ListJob:
    name, version = str(pointer["name"]), str(pointer["version"])
    return ListJob(info, make_run_id(info.key, info.etag, name, version), name, version)


# ----------------------------------------------------------------------------- list I/O


def download_to(storage: Any, key: str, dest: Path, chunk: int = 8 << 20) -> Path:
    """Stream an object to a local file (no full copy in memory)."""
    fs, base = storage.arrow_fs()
    path = f"{base}/{key}" if base else key
    tmp = dest.with_name(dest.name + ".part")
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
            while block := src.read(chunk):
                out.write(block)
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{storage.url_for(key)} does not exist") from exc
    except OSError as exc:
        if "NoSuchKey" in str(exc) or "does not exist" in str(exc).lower():
            raise ObjectNotFound(f"{storage.url_for(key)} does not exist") from exc
        raise StorageError(f"cannot download {storage.url_for(key)}: {exc}") from exc
    os.replace(tmp, dest)
    return dest


def download_list_version(storage: Any, info: ObjectInfo, dest: Path) -> Path:
    """Download the list version ``info`` names, or raise ListVersionGone.

    The ETag is checked again after the download, so results and the ledger entry are
    never recorded under one version's ETag for another version's content."""
    try:
        local = download_to(storage, info.key, dest)
        now = storage.head(info.key)
    except ObjectNotFound as exc:
        raise ListVersionGone(f"{info.key} was deleted before it was read") from exc
    if now.etag != info.etag:
        raise ListVersionGone(
            f"{info.key} was replaced while it was read (ETag {info.etag} -> {now.etag})"
        )
    return local


def publish_file(storage: Any, key: str, local: Path, content_type: str) -> None:
    """Upload a finished local file under ``key`` in one atomic publish (see put_file)."""
    storage.put_file(key, local, content_type)


@dataclass
class ScanResult:
    """What the first pass learned about a list."""

    rows: int
    labelled: bool
    unique: dict[str, ImageRef]  # cache_id -> fetchable reference, sorted for determinism
    invalid_rows: int


def scan_pair_list(path: Path, fmt: str, resolver: RefResolver, source: str) -> ScanResult:
    """First pass: validate the whole list (PairListError rejects it), collect unique refs."""
    unique: dict[str, ImageRef] = {}
    rows = invalid = 0
    labelled = False
    for chunk in iter_pair_chunks(path, fmt, source=source):
        rows += len(chunk)
        labelled = labelled or bool((chunk.label != NO_LABEL).any())
        for err, a, b in zip(chunk.error, chunk.image_a, chunk.image_b, strict=True):
            if err:
                invalid += 1
                continue
            ra, rb = resolver(a), resolver(b)
            if ra.fetchable and rb.fetchable:  # a pair with a forbidden side is never fetched
                unique.setdefault(ra.cache_id, ra)
                unique.setdefault(rb.cache_id, rb)
    from core.pairlists import has_label_column

    labelled = labelled or has_label_column(path, fmt)
    ordered = dict(sorted(unique.items()))
    return ScanResult(rows, labelled, ordered, invalid)


# ----------------------------------------------------------------------------- images


@dataclass
class EmbeddingTable:
    """Unique image -> embedding row, or -> (status, error) when it could not be embedded."""

    index: dict[str, int] = field(default_factory=dict)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    seconds: float = 0.0

    def add(self, ids: list[str], emb: np.ndarray) -> None:
        emb = np.asarray(emb, dtype=np.float32)
        if self.vectors.size == 0:
            self.vectors = np.zeros((max(len(ids), 1024), emb.shape[1]), np.float32)
        n = len(self.index)
        need = n + len(ids)
        if need > len(self.vectors):
            grown = np.zeros((max(need, 2 * len(self.vectors)), emb.shape[1]), np.float32)
            grown[:n] = self.vectors[:n]
            self.vectors = grown
        self.vectors[n:need] = emb
        for i, cid in enumerate(ids):
            self.index[cid] = n + i

    def fail(self, cid: str, status: str, error: str) -> None:
        self.failures[cid] = (status, error)


FaceOrError = tuple[str, np.ndarray | None, str, str]  # (cache_id, face, status, error)


def fetch_image_bytes(
    storage: Any, key: str, attempts: int = 3, max_bytes: int | None = None
) -> bytes:
    """Get one object, retrying transient storage errors (never a missing or oversized
    object). ``max_bytes``: refuse a bigger object without downloading it."""
    for attempt in range(attempts):
        try:
            return storage.get_bytes(key, max_bytes=max_bytes)
        except (ObjectNotFound, ObjectTooLarge, ObjectUnreadable):
            raise
        except StorageError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def load_face(storage: Any, ref: ImageRef, detect: str = "auto") -> FaceOrError:
    """Fetch + preprocess one image; what is wrong with the image becomes a status.

    A storage failure that outlived the retries (throttling, expired credentials, access
    denied) raises: the list fails and the next run retries it, rather than its rows being
    recorded for good as ``missing_image``. An object no retry can read (archived,
    unreadable file) is ``unreadable_image``, so one such image cannot block its list."""
    from models.preprocessing import DEFAULT_PARAMS, ImageError, preprocess_image

    try:
        data = fetch_image_bytes(storage, ref.target, max_bytes=DEFAULT_PARAMS.max_bytes)
    except ObjectNotFound:
        return ref.cache_id, None, "missing_image", f"{ref.raw}: no such object"
    except (ObjectTooLarge, ObjectUnreadable) as exc:  # this image, for good
        return ref.cache_id, None, "unreadable_image", f"{ref.raw}: {exc}"
    except StorageError as exc:
        raise StorageError(f"fetching image {ref.raw!r}: {exc}") from exc
    try:
        face = preprocess_image(data, detect=detect)  # type: ignore[arg-type]
        return ref.cache_id, face, "ok", ""
    except ImageError as exc:
        return ref.cache_id, None, exc.status, f"{ref.raw}: {exc}"
    except Exception as exc:  # a decoder bug must not kill the list
        return ref.cache_id, None, "unreadable_image", f"{ref.raw}: {type(exc).__name__}: {exc}"


def iter_lfw_faces(storage: Any, refs: list[ImageRef]) -> Iterator[FaceOrError]:
    """Faces of ``lfw:`` references from the ingested dataset's preprocessed ``face`` column.

    Shards are read one at a time (image_id + face columns only) and filtered to the
    wanted ids, so memory stays at one shard plus the faces asked for.
    """
    if not refs:
        return
    import pyarrow.compute as pc

    from core.dataset import FACE_SHAPE, read_manifest, shard_key

    wanted = {r.target: r for r in refs}
    try:
        manifest = read_manifest(storage)
    except ObjectNotFound as exc:
        for ref in refs:
            yield ref.cache_id, None, "missing_image", f"{ref.raw}: {exc}"
        return
    version = manifest["version"]
    found: set[str] = set()
    for shard in range(int(manifest["counts"]["shards"])):
        table = storage.read_parquet(shard_key(version, shard), columns=["image_id", "face"])
        table = table.filter(pc.is_in(table["image_id"], pa.array(list(wanted))))
        if table.num_rows == 0:
            continue
        ids = table["image_id"].to_pylist()
        flat = table["face"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        faces = np.asarray(flat, np.float32).reshape(len(ids), *FACE_SHAPE)
        for image_id, face in zip(ids, faces, strict=True):
            found.add(image_id)
            yield wanted[image_id].cache_id, face, "ok", ""
    for image_id, ref in wanted.items():
        if image_id not in found:
            yield (
                ref.cache_id,
                None,
                "missing_image",
                (f"{ref.raw}: no image {image_id} in LFW dataset version {version}"),
            )


def iter_unique_faces(
    storage: Any,
    refs: Iterable[ImageRef],
    max_concurrency: int = 16,
    detect: str = "auto",
    lookahead: int = 512,
) -> Iterator[FaceOrError]:
    """Each unique image fetched and preprocessed once, ``max_concurrency`` at a time.

    Results come back in input order (deterministic batches). At most ``lookahead``
    loads are queued or done-but-unconsumed, so memory is bounded (a preprocessed face is
    15 KB; raw bytes are dropped as soon as a face is cut) while the pool keeps fetching
    during an embedding batch.
    """
    refs = list(refs)
    yield from iter_lfw_faces(storage, [r for r in refs if r.kind == "lfw"])
    keys = [r for r in refs if r.kind == "key"]
    workers = max(1, int(max_concurrency))
    limit = max(2 * workers, int(lookahead))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="verify-load")
    window: deque[Future[FaceOrError]] = deque()
    try:
        for ref in keys:
            window.append(pool.submit(load_face, storage, ref, detect))
            if len(window) >= limit:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        # on a failed load (or a consumer that stops early) the queued loads are dropped,
        # not run: a list failing on an unreachable bucket must not first retry every
        # image in the look-ahead window
        pool.shutdown(wait=True, cancel_futures=True)


def embed_faces(
    faces: Iterable[FaceOrError],
    embed: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> EmbeddingTable:
    """Embed faces in batches of ``batch_size``; failures are recorded with their status."""
    table = EmbeddingTable()
    start = time.perf_counter()
    ids: list[str] = []
    batch: list[np.ndarray] = []
    done = 0

    def flush() -> None:
        if batch:
            table.add(ids.copy(), embed(np.stack(batch)))
            ids.clear()
            batch.clear()

    for cid, face, status, error in faces:
        done += 1
        if face is None:
            table.fail(cid, status, error)
        else:
            ids.append(cid)
            batch.append(face)
            if len(batch) >= batch_size:
                flush()
        if on_progress and done % 500 == 0:
            on_progress(done)
    flush()
    if on_progress:
        on_progress(done)
    table.seconds = time.perf_counter() - start
    return table


# ----------------------------------------------------------------------------- scoring


@dataclass
class ListSummary:
    """Counts and (when labelled) quality figures of one verified list."""

    list_key: str
    rows: int = 0
    status_counts: Counter = field(default_factory=Counter)
    same: int = 0
    different: int = 0
    labelled: bool = False
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    _scores: list[np.ndarray] = field(default_factory=list, repr=False)
    _labels: list[np.ndarray] = field(default_factory=list, repr=False)

    def add_labelled(self, scores: np.ndarray, labels: np.ndarray, same: np.ndarray) -> None:
        self._scores.append(scores.astype(np.float32))
        self._labels.append(labels.astype(np.int8))
        self.tp += int(((labels == 1) & same).sum())
        self.fn += int(((labels == 1) & ~same).sum())
        self.fp += int(((labels == 0) & same).sum())
        self.tn += int(((labels == 0) & ~same).sum())

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows": self.rows,
            "status_counts": {s: int(self.status_counts.get(s, 0)) for s in STATUSES},
            "same_person": self.same,
            "different_person": self.different,
        }
        n = self.tp + self.fp + self.tn + self.fn
        if self.labelled and n:
            from models.evaluation import roc_auc

            scores = np.concatenate(self._scores)
            labels = np.concatenate(self._labels)
            auc = roc_auc(scores, labels) if 0 < labels.sum() < len(labels) else None
            out.update(
                labelled_pairs_scored=n,
                accuracy=(self.tp + self.tn) / n,
                roc_auc=auc,
                confusion_matrix={"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn},
            )
        return out


def _row_statuses(
    chunk: PairChunk, resolver: RefResolver, table: EmbeddingTable
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Status and error per row, and embedding rows (-1 when not ok) for sides a and b."""
    n = len(chunk)
    statuses = ["ok"] * n
    errors = [""] * n
    ia = np.full(n, -1, np.int64)
    ib = np.full(n, -1, np.int64)
    index, failures = table.index, table.failures
    for i in range(n):
        if chunk.error[i]:
            statuses[i], errors[i] = "invalid_row", chunk.error[i]
            continue
        ra, rb = resolver(chunk.image_a[i]), resolver(chunk.image_b[i])
        bad = [(side, r) for side, r in (("image_a", ra), ("image_b", rb)) if not r.fetchable]
        if bad:
            # forbidden wins over invalid so the security signal is never hidden
            side, ref = min(bad, key=lambda sr: sr[1].kind != "forbidden")
            statuses[i] = ref.status or "invalid_row"
            errors[i] = "; ".join(f"{s}: {r.error}" for s, r in bad)
            continue
        ja, jb = index.get(ra.cache_id, -1), index.get(rb.cache_id, -1)
        if ja < 0 or jb < 0:
            fails = [
                (s, failures.get(r.cache_id, ("missing_image", f"{r.raw}: not loaded")))
                for s, r, j in (("image_a", ra, ja), ("image_b", rb, jb))
                if j < 0
            ]
            statuses[i] = fails[0][1][0]
            errors[i] = "; ".join(f"{s}: {err}" for s, (_, err) in fails)
            continue
        ia[i], ib[i] = ja, jb
    return statuses, errors, ia, ib


def score_pair_list(
    path: Path,
    fmt: str,
    resolver: RefResolver,
    table: EmbeddingTable,
    job: ListJob,
    threshold: float,
    labelled: bool,
    out_dir: Path,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[Path, Path, ListSummary]:
    """Second pass: score each chunk in bulk and append it to local Parquet + CSV files."""
    schema = LABELLED_SCHEMA if labelled else RESULT_SCHEMA
    parquet_path, csv_path = out_dir / "results.parquet", out_dir / "results.csv"
    summary = ListSummary(job.info.key, labelled=labelled)
    with (
        pq.ParquetWriter(parquet_path, schema, compression="zstd") as pw,
        pacsv.CSVWriter(csv_path, schema) as cw,
    ):
        for chunk in iter_pair_chunks(path, fmt, source=job.info.key):
            statuses, errors, ia, ib = _row_statuses(chunk, resolver, table)
            ok = ia >= 0
            scores = np.full(len(chunk), np.nan, np.float32)
            if ok.any():
                va, vb = table.vectors[ia[ok]], table.vectors[ib[ok]]
                scores[ok] = np.einsum("ij,ij->i", va, vb)
            same = scores >= threshold
            summary.rows += len(chunk)
            summary.status_counts.update(statuses)
            summary.same += int(same[ok].sum())
            summary.different += int((~same[ok]).sum())
            if labelled:
                has = ok & (chunk.label != NO_LABEL)
                summary.add_labelled(scores[has], chunk.label[has], same[has])
            n = len(chunk)
            columns: dict[str, Any] = {
                "pair_id": pa.array(chunk.pair_id, pa.string()),
                "image_a": pa.array([_text(v) for v in chunk.image_a], pa.string()),
                "image_b": pa.array([_text(v) for v in chunk.image_b], pa.string()),
                "score": pa.array(scores, pa.float32(), mask=~ok),
                "threshold": pa.array(np.full(n, threshold, np.float32)),
                "same_person": pa.array(same, pa.bool_(), mask=~ok),
                "model_name": pa.array([job.model_name] * n, pa.string()),
                "model_version": pa.array([job.model_version] * n, pa.string()),
                "status": pa.array(statuses, pa.string()),
                "error": pa.array([e or None for e in errors], pa.string()),
            }
            if labelled:
                columns["label"] = pa.array(chunk.label, pa.int8(), mask=chunk.label == NO_LABEL)
            batch = pa.RecordBatch.from_pydict(columns, schema=schema)
            pw.write_batch(batch)
            cw.write_batch(batch)
            if on_chunk:
                on_chunk(summary.rows)
    return parquet_path, csv_path, summary


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------- artifacts


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "list"


def in_prefect_run() -> bool:
    """Artifacts need a flow/task run; outside one (benchmarks, plain calls) skip them."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Progress:
    """A Prefect progress artifact when inside a run; silently nothing outside one."""

    def __init__(self, description: str):
        self.id: Any = None
        self.last = -1.0
        if not in_prefect_run():
            return
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, description=description)
        except Exception:  # not in a flow/task run (plain function use, benchmarks)
            self.id = None

    def update(self, fraction: float) -> None:
        pct = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        if self.id is None or pct - self.last < 5 and pct < 100:
            return
        self.last = pct
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, pct)
        except Exception:
            log.debug("progress artifact update failed", exc_info=True)


def summary_row(job: ListJob, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    rows = metrics["rows"]
    row: dict[str, Any] = {
        "list": job.info.key,
        "results": job.result_key,
        "model": f"{job.model_name} {job.model_version}",
        "rows": rows,
        **{s: metrics["status_counts"][s] for s in STATUSES},
        "same": metrics["same_person"],
        "different": metrics["different_person"],
        "accuracy": round(metrics["accuracy"], 4) if "accuracy" in metrics else None,
        "roc_auc": round(metrics["roc_auc"], 4) if metrics.get("roc_auc") is not None else None,
        "seconds": round(seconds, 2),
        "pairs_per_s": round(rows / seconds, 1) if seconds > 0 else None,
    }
    return row


def publish_summary_artifact(job: ListJob, row: dict[str, Any], metrics: dict[str, Any]) -> None:
    if not in_prefect_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        key = artifact_key(f"verify-{job.stem}")
        create_table_artifact([row], key=key, description=f"verify_pairs summary: {job.info.key}")
        if "confusion_matrix" in metrics:
            cm = metrics["confusion_matrix"]
            create_markdown_artifact(
                f"### {job.info.key}\n\naccuracy {metrics['accuracy']:.4f}, ROC AUC "
                f"{metrics['roc_auc']}, threshold from {job.model_name} {job.model_version}\n\n"
                "| | predicted same | predicted different |\n|---|---|---|\n"
                f"| same | {cm['tp']} | {cm['fn']} |\n| different | {cm['fp']} | {cm['tn']} |\n",
                key=artifact_key(f"verify-{job.stem}-confusion"),
            )
    except Exception:
        log.debug("summary artifact not written (not in a run?)", exc_info=True)


# ----------------------------------------------------------------------------- one list


EmbedUnique = Callable[[dict[str, ImageRef], "Progress"], EmbeddingTable]


def local_embed_unique(
    storage: Any, embedder: Any, max_concurrency: int, batch_size: int
) -> EmbedUnique:
    """The local backend: this process fetches, preprocesses and embeds."""

    def run(unique: dict[str, ImageRef], progress: Progress) -> EmbeddingTable:
        total = max(len(unique), 1)
        faces = iter_unique_faces(storage, unique.values(), max_concurrency)
        return embed_faces(
            faces, embedder.embed, batch_size, lambda n: progress.update(0.7 * n / total)
        )

    return run


def result_entry(job: ListJob, metrics: dict[str, Any], seconds: float, backend: str) -> dict:
    return {
        "run_id": job.run_id,
        "result_key": job.result_key,
        "csv_key": job.csv_key,
        "model_name": job.model_name,
        "model_version": job.model_version,
        "backend": backend,
        "seconds": round(seconds, 3),
        "metrics": metrics,
    }


def verify_list(
    storage: Any,
    job: ListJob,
    threshold: float,
    embed_unique: EmbedUnique,
    allowed_prefixes: Iterable[str],
    work_dir: Path,
) -> dict[str, Any]:
    """Scan, embed, score and publish one list. Raises PairListError for unparseable lists.

    Returns the ledger entry (not yet recorded: the caller records it after publishing).
    """
    start = time.perf_counter()
    fmt = list_format(job.info.key)
    local = download_list_version(storage, job.info, work_dir / f"list.{fmt}")
    resolver = RefResolver(storage, list(allowed_prefixes))
    progress = Progress(f"verifying {job.info.key}")
    scan = scan_pair_list(local, fmt, resolver, job.info.key)
    table = embed_unique(scan.unique, progress)
    rows = max(scan.rows, 1)
    parquet_path, csv_path, summary = score_pair_list(
        local,
        fmt,
        resolver,
        table,
        job,
        threshold,
        scan.labelled,
        work_dir,
        on_chunk=lambda n: progress.update(0.7 + 0.25 * n / rows),
    )
    metrics = summary.metrics()
    metrics["unique_images"] = len(scan.unique)
    metrics["embedded_images"] = len(table.index)
    metrics["embed_seconds"] = round(table.seconds, 3)
    publish_file(storage, job.csv_key, csv_path, "text/csv")
    publish_file(storage, job.result_key, parquet_path, "application/vnd.apache.parquet")
    progress.update(1.0)
    seconds = time.perf_counter() - start
    metrics["pairs_per_s"] = round(summary.rows / seconds, 1) if seconds > 0 else None
    publish_summary_artifact(job, summary_row(job, metrics, seconds), metrics)
    return result_entry(job, metrics, seconds, "")


def check_pair_list(storage: Any, info: ObjectInfo, work_dir: Path) -> None:
    """Read a list version through without verifying it: PairListError if unparseable.

    Used when there is no model to verify with, so a bad drop is still rejected at once
    (and its author told why) instead of waiting for the first promotion."""
    fmt = list_format(info.key)
    local = download_list_version(storage, info, work_dir / f"list.{fmt}")
    for _ in iter_pair_chunks(local, fmt, source=info.key):
        pass


def record_in_ledger(storage: Any, job: ListJob, entry: dict[str, Any]) -> bool:
    return record_processed(storage, job.info.key, job.info.etag, entry)


def reject(storage: Any, info: ObjectInfo, error: str) -> str:
    return reject_list(storage, info, error)


def entry_json(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- @tasks
# Retries only where the work is I/O that a retry can fix; per-image and per-row
# failures are statuses, and PairListError is final (the list is rejected).

from prefect import task  # noqa: E402
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402


@task(name="find_pending_lists", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def find_pending_lists(storage: Any, list_key: str | None = None) -> list[ObjectInfo]:
    """Unprocessed list versions under incoming/, oldest first (or just ``list_key``)."""
    from core.ledger import is_processed, pending_lists

    if list_key:
        try:
            info = storage.head(check_list_key(list_key))
        except ObjectNotFound:  # e.g. another run rejected it after the event was sent
            from prefect import get_run_logger

            get_run_logger().warning("%s is no longer there: nothing to verify", list_key)
            return []
        return [] if is_processed(storage, info.key, info.etag) else [info]
    return list(pending_lists(storage))


def _retry_unless_registry_error(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry storage hiccups, not "nothing promoted yet" or a malformed pointer."""
    from core.registry import RegistryError

    return not isinstance(state.result(raise_on_failure=False), RegistryError)


@task(
    name="load_production_model",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_unless_registry_error,
    cache_policy=NO_CACHE,
)
def load_production_model_task(
    storage: Any,
    model_name: str,
    cache_dir: str,
    with_embedder: bool = True,
    precision: str = "float32",
) -> tuple[dict[str, Any], Any]:
    """The production pointer (and the embedder, unless a remote backend embeds)."""
    from core.registry import RegistryError, get_production

    name = choose_model_name(storage, model_name)
    if not with_embedder:
        pointer = get_production(storage, name)
        if pointer is None:
            raise RegistryError(f"no production model for {name!r} in {storage.uri}")
        return pointer, None
    return load_model(storage, name, cache_dir, precision=precision)


@task(name="verify_pair_list", cache_policy=NO_CACHE)
def verify_pair_list(
    storage: Any,
    job: ListJob,
    threshold: float,
    embed_unique: EmbedUnique,
    allowed_prefixes: list[str],
    backend: str,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        entry = verify_list(storage, job, threshold, embed_unique, allowed_prefixes, Path(tmp))
    entry["backend"] = backend
    return entry


@task(name="check_pair_list", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def check_pair_list_task(storage: Any, info: ObjectInfo) -> str | None:
    """The PairListError message of an unparseable list version, None if it parses.
    Other failures (I/O, a version replaced meanwhile) raise as usual."""
    from core.pairlists import PairListError

    with tempfile.TemporaryDirectory(prefix="check-") as tmp:
        try:
            check_pair_list(storage, info, Path(tmp))
        except PairListError as exc:
            return str(exc)
    return None


@task(name="reject_pair_list", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def reject_pair_list(storage: Any, info: ObjectInfo, error: str) -> str:
    return reject(storage, info, error)


@task(name="check_ledger", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def ledger_entry_task(storage: Any, info: ObjectInfo) -> dict[str, Any] | None:
    """The ledger entry of this list version, if a run recorded one (None: unverified)."""
    from core.ledger import read_entry

    return read_entry(storage, info.key, info.etag)


@task(name="record_in_ledger", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def record_in_ledger_task(storage: Any, job: ListJob, entry: dict[str, Any]) -> bool:
    return record_in_ledger(storage, job, entry)
