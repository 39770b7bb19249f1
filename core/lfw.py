"""LFW on disk: locate it through scikit-learn's layout, list its images, parse its protocol.

scikit-learn's ``data_home/lfw_home`` layout is the source of truth (so an offline mirror or
sklearn's own download both work). We read the same files sklearn reads rather than calling
``fetch_lfw_people``, because that caches arrays into ``data_home`` (which may be read-only)
and bakes in its own crop; our pixels come from ``models.preprocessing`` instead.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import re
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.preprocessing import DEFAULT_PARAMS, ImageError, PreprocessParams, preprocess_image

logger = logging.getLogger(__name__)

IMAGES_FOLDER = "lfw_funneled"  # what sklearn reads with funneled=True

# table name -> (protocol file, kind)
PROTOCOL_FILES: dict[str, tuple[str, str]] = {
    "pairs_view1_train": ("pairsDevTrain.txt", "pairs"),
    "pairs_view1_test": ("pairsDevTest.txt", "pairs"),
    "pairs_view2": ("pairs.txt", "pairs"),
    "people_view1_train": ("peopleDevTrain.txt", "people"),
    "people_view1_test": ("peopleDevTest.txt", "people"),
    "people_view2": ("people.txt", "people_folds"),
}
OPTIONAL_FILES = ("lfw-names.txt",)

# scikit-learn downloads the images and the three pairs files, not the people files (the
# identities of View 1 and the ten View 2 folds); they come from the LFW site, checked
# against the digests of the official files
PEOPLE_FILES_URL = "http://vis-www.cs.umass.edu/lfw/"
PEOPLE_FILES_SHA256 = {
    "people.txt": "bc8fa2b7f25c895cf7efb6de4f4fc27ca8b8d1cfa63350ad8b96eae2b198d365",
    "peopleDevTrain.txt": "2e58df13ba4cc143189336e001cc2c195f1dfa5b29a6475c02857be353c2a2fa",
    "peopleDevTest.txt": "c3ed1f90499473401542101a56c14c1d82396bb8218c67a356d7460601047555",
}
PEOPLE_FILE_MAX_BYTES = 1 << 20  # the biggest, people.txt, is ~90 KB

PAIRS_SCHEMA = pa.schema(
    [
        ("fold", pa.int32()),
        ("pair_index", pa.int32()),
        ("person_a", pa.string()),
        ("index_a", pa.int32()),
        ("person_b", pa.string()),
        ("index_b", pa.int32()),
        ("image_id_a", pa.string()),
        ("image_id_b", pa.string()),
        ("label", pa.int8()),
    ]
)
PEOPLE_SCHEMA = pa.schema([("person", pa.string()), ("n_images", pa.int32())])
PEOPLE_FOLDS_SCHEMA = pa.schema(
    [("fold", pa.int32()), ("person", pa.string()), ("n_images", pa.int32())]
)


class LfwError(RuntimeError):
    """LFW could not be found, downloaded or read."""


class LfwNotFoundError(LfwError, FileNotFoundError):
    """A required LFW file or folder is missing (the message names it)."""


class ProtocolFileError(LfwError, ValueError):
    """A protocol file does not follow the official format (message: file and line)."""


class CorruptImageError(LfwError, ValueError):
    """An LFW image could not be decoded (message names the file)."""


def image_id(person: str, index: int) -> str:
    """``George_W_Bush/0001``: the dataset's key for an LFW image."""
    return f"{person}/{index:04d}"


@dataclass(frozen=True)
class LfwSource:
    """Where one LFW copy lives (``lfw_home`` in sklearn's layout)."""

    lfw_home: Path

    @property
    def images_dir(self) -> Path:
        return self.lfw_home / IMAGES_FOLDER

    def protocol_path(self, filename: str) -> Path:
        return self.lfw_home / filename


@dataclass(frozen=True)
class ImageRef:
    person: str
    index: int  # 1-based, as in the file name
    path: str

    @property
    def image_id(self) -> str:
        return image_id(self.person, self.index)


def locate_lfw(
    data_home: str | Path | None,
    download_if_missing: bool = False,
    people_files_url: str = PEOPLE_FILES_URL,
) -> LfwSource:
    """Find (or, if allowed, download) LFW under ``data_home/lfw_home``.

    Images and pairs files come through scikit-learn's downloader, the people files from
    ``people_files_url`` (see :func:`download_people_files`). Never writes into
    ``data_home`` unless a download was asked for, so a read-only mirror is fine. Raises
    :class:`LfwNotFoundError` naming the missing file or folder, and :class:`LfwError`
    when a download fails.
    """
    from sklearn.datasets import get_data_home
    from sklearn.datasets._lfw import _check_fetch_lfw

    home = Path(data_home).expanduser() if data_home else Path(get_data_home())
    lfw_home = home / "lfw_home"
    hint = (
        "point FACEREID_LFW_DATA_HOME (or the data_home parameter) at a folder holding "
        "lfw_home/, or pass download_if_missing=True"
    )
    if not download_if_missing:
        # checked here, without scikit-learn: it would create folders, or extract an
        # lfw-funneled.tgz it finds and delete it, in what may be a read-only mirror
        source = LfwSource(lfw_home)
        _check_offline_copy(source, hint)
        return source
    try:
        found_home, _ = _check_fetch_lfw(
            data_home=str(home), funneled=True, download_if_missing=download_if_missing
        )
    except Exception as exc:  # URLError, timeouts, checksum mismatches, a bad archive
        raise LfwError(f"could not download LFW into {lfw_home}: {exc}") from exc
    source = LfwSource(Path(found_home))
    download_people_files(source.lfw_home, people_files_url)
    _check_offline_copy(source, hint)
    return source


def _check_offline_copy(source: LfwSource, hint: str) -> None:
    """The images folder and every protocol file, each named when it is missing."""
    lfw_home = source.lfw_home
    if not lfw_home.is_dir():
        raise LfwNotFoundError(f"LFW folder {lfw_home} does not exist; {hint}")
    if not source.images_dir.is_dir():
        others = [
            name
            for name in ("lfw-deepfunneled", "lfw_deepfunneled", "lfw", "lfw-funneled.tgz")
            if (lfw_home / name).exists()
        ]
        found = (
            f" ({', '.join(others)} found there: facereid reads the funneled images, "
            f"extracted to {IMAGES_FOLDER}/, as scikit-learn's funneled=True does)"
            if others
            else ""
        )
        raise LfwNotFoundError(
            f"LFW images folder {source.images_dir} does not exist{found}; {hint}"
        )
    for filename, _kind in PROTOCOL_FILES.values():
        if not source.protocol_path(filename).is_file():
            raise LfwNotFoundError(f"LFW protocol file {source.protocol_path(filename)} is missing")


def download_people_files(
    lfw_home: Path, base_url: str = PEOPLE_FILES_URL, timeout_s: float = 60.0
) -> list[str]:
    """Fetch the people files missing from ``lfw_home``; return the names fetched.

    Each is checked against its pinned SHA-256 before it is published (temp file +
    rename), so a proxy's error page or a truncated body never becomes a protocol file.
    ``base_url`` may point at a mirror (``file://`` works too)."""
    import os
    import tempfile
    import urllib.request

    fetched = []
    for name, expected in PEOPLE_FILES_SHA256.items():
        target = lfw_home / name
        if target.is_file():
            continue
        url = base_url.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
                data = response.read(PEOPLE_FILE_MAX_BYTES + 1)
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, a bad URL
            raise LfwError(f"could not download LFW protocol file {url}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise LfwError(
                f"{url} is not the LFW {name}: sha256 {digest}, expected {expected} "
                f"({len(data)} bytes)"
            )
        fd, tmp = tempfile.mkstemp(dir=lfw_home, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("downloaded %s", url)
        fetched.append(name)
    return fetched


_IMAGE_NAME = re.compile(r"^(?P<person>.+)_(?P<index>\d{4})\.jpg$")


def list_images(source: LfwSource) -> list[ImageRef]:
    """Every ``<Person>/<Person>_NNNN.jpg``, sorted by person then index; clutter ignored."""
    root = source.images_dir
    if not root.is_dir():
        raise LfwNotFoundError(f"LFW images folder {root} is missing")
    refs: list[ImageRef] = []
    skipped: list[str] = []
    for person_dir in sorted(root.iterdir()):
        if not person_dir.is_dir():
            skipped.append(person_dir.name)
            continue
        person = person_dir.name
        for file in sorted(person_dir.iterdir()):
            m = _IMAGE_NAME.match(file.name)
            if m is None or m["person"] != person or not file.is_file():
                skipped.append(f"{person}/{file.name}")
                continue
            refs.append(ImageRef(person, int(m["index"]), str(file)))
    if skipped:
        logger.info("ignored %d non-image entries under %s: %s", len(skipped), root, skipped[:5])
    if not refs:
        raise LfwNotFoundError(f"no LFW images (<Person>/<Person>_NNNN.jpg) under {root}")
    refs.sort(key=lambda r: (r.person, r.index))
    return refs


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- protocol files


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split fields) of every non-blank line."""
    out = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise ProtocolFileError(
            f"{path}: not UTF-8 text (byte {exc.start}, line {lineno}); LFW's protocol "
            "files are plain ASCII"
        ) from exc
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
        fields = line.split()
        if fields:
            out.append((lineno, fields))
    return out


def _int(path: Path, lineno: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ProtocolFileError(f"{path}:{lineno}: expected an integer, got {value!r}") from None


def parse_pairs_file(path: Path) -> pa.Table:
    """pairs.txt / pairsDevTrain.txt / pairsDevTest.txt -> pairs table.

    Header ``<sets>\\t<n>`` (pairs.txt: 10 folds of 300) or just ``<n>`` (View 1, one set);
    each set is ``n`` matched lines ``name i j`` then ``n`` mismatched ``name i name j``.
    """
    lines = _lines(path)
    if not lines:
        raise ProtocolFileError(f"{path}: empty protocol file")
    (hline, header), body = lines[0], lines[1:]
    if len(header) == 2:
        n_sets, per_set = _int(path, hline, header[0]), _int(path, hline, header[1])
    elif len(header) == 1:
        n_sets, per_set = 1, _int(path, hline, header[0])
    else:
        raise ProtocolFileError(f"{path}:{hline}: bad header {' '.join(header)!r}")
    expected = n_sets * 2 * per_set
    if len(body) != expected:
        raise ProtocolFileError(
            f"{path}: header promises {expected} pairs ({n_sets} x 2 x {per_set}), "
            f"found {len(body)}"
        )
    cols: dict[str, list] = {name: [] for name in PAIRS_SCHEMA.names}
    for i, (lineno, f) in enumerate(body):
        same = (i % (2 * per_set)) < per_set
        if same and len(f) == 3:
            pa_, ia, pb, ib = f[0], _int(path, lineno, f[1]), f[0], _int(path, lineno, f[2])
        elif not same and len(f) == 4:
            pa_, ia, pb, ib = f[0], _int(path, lineno, f[1]), f[2], _int(path, lineno, f[3])
        else:
            want = "name i j (matched)" if same else "name_a i name_b j (mismatched)"
            raise ProtocolFileError(f"{path}:{lineno}: expected {want}, got {' '.join(f)!r}")
        cols["fold"].append(i // (2 * per_set) if n_sets > 1 else 0)
        cols["pair_index"].append(i)
        cols["person_a"].append(pa_)
        cols["index_a"].append(ia)
        cols["person_b"].append(pb)
        cols["index_b"].append(ib)
        cols["image_id_a"].append(image_id(pa_, ia))
        cols["image_id_b"].append(image_id(pb, ib))
        cols["label"].append(1 if same else 0)
    return pa.table(cols, schema=PAIRS_SCHEMA)


def parse_people_file(path: Path) -> pa.Table:
    """peopleDevTrain.txt / peopleDevTest.txt: ``<n>`` then ``n`` lines ``name count``."""
    lines = _lines(path)
    if not lines:
        raise ProtocolFileError(f"{path}: empty protocol file")
    (hline, header), body = lines[0], lines[1:]
    n = _int(path, hline, header[0])
    if len(body) != n:
        raise ProtocolFileError(f"{path}: header promises {n} people, found {len(body)}")
    people, counts = [], []
    for lineno, f in body:
        if len(f) != 2:
            raise ProtocolFileError(f"{path}:{lineno}: expected 'name count', got {' '.join(f)!r}")
        people.append(f[0])
        counts.append(_int(path, lineno, f[1]))
    return pa.table({"person": people, "n_images": counts}, schema=PEOPLE_SCHEMA)


def parse_people_folds_file(path: Path) -> pa.Table:
    """people.txt: ``<folds>``, then per fold ``<n>`` and ``n`` lines ``name count``."""
    lines = _lines(path)
    if not lines:
        raise ProtocolFileError(f"{path}: empty protocol file")
    n_folds = _int(path, lines[0][0], lines[0][1][0])
    folds, people, counts = [], [], []
    pos = 1
    for fold in range(n_folds):
        if pos >= len(lines):
            raise ProtocolFileError(f"{path}: header promises {n_folds} folds, found {fold}")
        lineno, f = lines[pos]
        if len(f) != 1:
            raise ProtocolFileError(f"{path}:{lineno}: expected a fold size, got {' '.join(f)!r}")
        n = _int(path, lineno, f[0])
        pos += 1
        for lineno, f in lines[pos : pos + n]:
            if len(f) != 2:
                raise ProtocolFileError(
                    f"{path}:{lineno}: expected 'name count', got {' '.join(f)!r}"
                )
            folds.append(fold)
            people.append(f[0])
            counts.append(_int(path, lineno, f[1]))
        if pos + n > len(lines):
            raise ProtocolFileError(f"{path}: fold {fold} promises {n} people, file ends early")
        pos += n
    if pos != len(lines):
        raise ProtocolFileError(f"{path}:{lines[pos][0]}: unexpected lines after the last fold")
    return pa.table(
        {"fold": folds, "person": people, "n_images": counts}, schema=PEOPLE_FOLDS_SCHEMA
    )


_PARSERS: dict[str, Callable[[Path], pa.Table]] = {
    "pairs": parse_pairs_file,
    "people": parse_people_file,
    "people_folds": parse_people_folds_file,
}


@dataclass(frozen=True)
class Protocol:
    tables: dict[str, pa.Table]
    file_hashes: dict[str, str]  # file name -> sha256


def read_protocol(source: LfwSource) -> Protocol:
    """Parse every official protocol file into its table (and hash the files)."""
    tables: dict[str, pa.Table] = {}
    hashes: dict[str, str] = {}
    for table, (filename, kind) in PROTOCOL_FILES.items():
        path = source.protocol_path(filename)
        if not path.is_file():
            raise LfwNotFoundError(f"LFW protocol file {path} is missing")
        tables[table] = _PARSERS[kind](path)
        hashes[filename] = file_sha256(path)
    for filename in OPTIONAL_FILES:
        path = source.protocol_path(filename)
        if path.is_file():
            hashes[filename] = file_sha256(path)
    return Protocol(tables, dict(sorted(hashes.items())))


def check_protocol_against_images(protocol: Protocol, images: Sequence[ImageRef]) -> list[str]:
    """Raise if a pair names a missing image; return warnings for people-count mismatches."""
    ids = {r.image_id for r in images}
    counts: dict[str, int] = {}
    for r in images:
        counts[r.person] = counts.get(r.person, 0) + 1
    for table, (filename, kind) in PROTOCOL_FILES.items():
        t = protocol.tables[table]
        if kind == "pairs":
            for col in ("image_id_a", "image_id_b"):
                missing = sorted(set(t.column(col).to_pylist()) - ids)
                if missing:
                    raise ProtocolFileError(
                        f"{filename} references {len(missing)} images that are not in the "
                        f"images folder, e.g. {missing[:3]}"
                    )
    warnings: list[str] = []
    for table, (filename, kind) in PROTOCOL_FILES.items():
        if kind == "pairs":
            continue
        t = protocol.tables[table]
        bad = [
            (p, n, counts.get(p, 0))
            for p, n in zip(
                t.column("person").to_pylist(), t.column("n_images").to_pylist(), strict=True
            )
            if counts.get(p, 0) != n
        ]
        if bad:
            warnings.append(
                f"{filename}: {len(bad)} people whose image count differs from the folder, "
                f"e.g. {bad[:3]} (name, file count, folder count)"
            )
    return warnings


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ProcessedChunk:
    sha256: list[str]
    jpeg: list[bytes]
    faces: np.ndarray  # (n, H, W) float32


def process_images(
    paths: Sequence[str], params: PreprocessParams = DEFAULT_PARAMS
) -> ProcessedChunk:
    """Read, hash and preprocess a batch of LFW files (runs inside pool workers)."""
    shas, jpegs = [], []
    faces = np.empty((len(paths), *params.shape), dtype=np.float32)
    for i, path in enumerate(paths):
        data = Path(path).read_bytes()
        try:
            faces[i] = preprocess_image(data, params, detect="never")
        except ImageError as exc:
            raise CorruptImageError(f"cannot preprocess LFW image {path}: {exc}") from None
        shas.append(hashlib.sha256(data).hexdigest())
        jpegs.append(data)
    return ProcessedChunk(shas, jpegs, faces)


def iter_processed(
    chunks: Sequence[Sequence[str]],
    params: PreprocessParams = DEFAULT_PARAMS,
    workers: int = 2,
) -> Generator[ProcessedChunk, None, None]:
    """Process chunks of paths in order, in a spawn pool when it pays off.

    ``spawn`` (not fork) because the caller may hold Prefect/boto threads and locks.
    Results come back in input order, so the caller can write while workers keep going.
    When the caller stops early (its upload failed), the chunks not started are cancelled
    and the pool shuts down once the running ones finish: killing a worker instead
    (``Pool.terminate``) can cut a result mid-write and hang the pool's reader for good.
    """
    work = partial(process_images, params=params)
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield work(chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        futures = [pool.submit(work, chunk) for chunk in chunks]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
