"""Parse and validate pair lists (CSV or Parquet), streaming in chunks.

A pair list has columns ``image_a``, ``image_b`` and optionally ``pair_id`` and ``label``
(1 same person / 0 different). Two kinds of problems:

* the *list* cannot be parsed at all (not UTF-8, not a CSV/Parquet file, required
  columns missing) -> :class:`PairListError`; the caller moves the list aside;
* a *row* is bad (missing reference, bad label, ragged CSV line, duplicate pair_id) ->
  the row is kept with an ``error`` and becomes status ``invalid_row``.

Chunks hold plain Python lists and small numpy arrays, so a million-row list is never in
memory at once.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LIST_SUFFIXES = (".csv", ".parquet", ".pq")
REQUIRED_COLUMNS = ("image_a", "image_b")
OPTIONAL_COLUMNS = ("pair_id", "label")
NO_LABEL = -1
DEFAULT_CHUNK_ROWS = 50_000
MAX_FIELD = 4096

csv.field_size_limit(1 << 20)


class PairListError(ValueError):
    """The list as a whole cannot be parsed; it is rejected with this message."""


@dataclass
class PairChunk:
    """Rows ``row_index[0]..`` of a list; ``error`` is "" for rows that parsed."""

    row_index: np.ndarray  # int64, 0-based position of the row in the list
    pair_id: list[str]
    image_a: list[Any]
    image_b: list[Any]
    label: np.ndarray  # int8: 1, 0 or NO_LABEL
    error: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pair_id)


def list_format(key: str) -> str:
    """'csv' or 'parquet' from the object name."""
    lower = key.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise PairListError(f"{key}: pair lists must end in .csv, .parquet or .pq")


def is_pair_list(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return not name.startswith(".") and key.lower().endswith(LIST_SUFFIXES)


def list_stem(key: str) -> str:
    """The results folder of a list: its path under ``incoming/`` without the suffix.

    ``incoming/night_1.csv`` -> ``night_1``; ``incoming/team/night_1.csv`` ->
    ``team/night_1`` (so two teams' ``night_1.csv`` never share a results folder)."""
    name = key[len("incoming/") :] if key.startswith("incoming/") else key.rsplit("/", 1)[-1]
    for suffix in LIST_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "unnamed"
    return name


def _parse_label(value: Any) -> tuple[int, str]:
    if value is None:
        return NO_LABEL, ""
    if isinstance(value, bool):
        return int(value), ""
    if isinstance(value, int | np.integer):
        return (
            (int(value), "")
            if value in (0, 1)
            else (NO_LABEL, f"label must be 0 or 1, got {value}")
        )
    if isinstance(value, float | np.floating):
        if value != value:
            return NO_LABEL, ""
        return (
            (int(value), "")
            if value in (0.0, 1.0)
            else (NO_LABEL, f"label must be 0 or 1, got {value}")
        )
    text = str(value).strip().lower()
    if text == "" or text in ("na", "nan", "null", "none"):
        return NO_LABEL, ""
    if text in ("1", "1.0", "true", "same"):
        return 1, ""
    if text in ("0", "0.0", "false", "different"):
        return 0, ""
    return NO_LABEL, f"label must be 0 or 1, got {str(value)[:40]!r}"


MALFORMED = "malformed CSV"


def _pair_id_text(value: Any) -> str:
    """A pair id as text; a missing one (None, NaN) is blank. Whole-number floats, which
    is what pandas writes for an integer column with gaps, keep their integer spelling, so
    results join back on the ids the user wrote."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def _first_bad_utf8(path: Path) -> tuple[int, int]:
    """(byte offset, 1-based line) of the first byte that is not UTF-8 in ``path``."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as fh:
        while block := fh.read(1 << 16):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                # exc.start counts from the bytes the decoder still held plus this block
                held = len(exc.object) - len(block)
                bad = offset - held + exc.start
                fh.seek(0)
                return bad, fh.read(bad).count(b"\n") + 1
            offset += len(block)
            line += block.count(b"\n")
    return offset, line


class _ChunkBuilder:
    """Accumulates rows, fills default pair ids, flags bad rows and duplicate ids."""

    def __init__(self, has_label: bool):
        self.has_label = has_label
        self.seen_ids: set[int] = set()  # 64-bit hashes: ~30 MB for a million ids
        self.default_ids: set[int] = set()  # those that are row numbers of blank pair_ids
        self.next_row = 0
        self._reset()

    def _reset(self) -> None:
        self.rows: list[int] = []
        self.ids: list[str] = []
        self.a: list[Any] = []
        self.b: list[Any] = []
        self.labels: list[int] = []
        self.errors: list[str] = []

    def add(self, pair_id: Any, a: Any, b: Any, label: Any, error: str = "") -> None:
        row = self.next_row
        self.next_row += 1
        pid = _pair_id_text(pair_id)
        defaulted = not pid
        if defaulted:
            pid = str(row)
        if len(pid) > MAX_FIELD:
            pid, error = pid[:64], error or "pair_id longer than 4096 characters"
        lab, lab_err = _parse_label(label) if self.has_label else (NO_LABEL, "")
        errors = [error] if error else []
        if lab_err:
            errors.append(lab_err)
        for name, value in (("image_a", a), ("image_b", b)):
            if error.startswith(MALFORMED):
                break  # the line's fields are unknown, not empty
            if value is None or (isinstance(value, str) and not value.strip()):
                errors.append(f"{name} is empty")
        key = hash(pid)
        if key in self.seen_ids:
            if defaulted:
                errors.append(
                    f"pair_id is blank and its default, the row number {pid}, is already used "
                    "as a pair_id: give this row an id"
                )
            elif key in self.default_ids:
                errors.append(
                    f"pair_id {pid[:80]!r} is already the default id of row {pid[:80]}, whose "
                    "pair_id is blank: give that row an id"
                )
            else:
                errors.append(f"duplicate pair_id {pid[:80]!r}")
        else:
            self.seen_ids.add(key)
            if defaulted:
                self.default_ids.add(key)
        self.rows.append(row)
        self.ids.append(pid)
        self.a.append(a)
        self.b.append(b)
        self.labels.append(lab)
        self.errors.append("; ".join(errors))

    def __len__(self) -> int:
        return len(self.rows)

    def flush(self) -> PairChunk:
        chunk = PairChunk(
            row_index=np.asarray(self.rows, dtype=np.int64),
            pair_id=self.ids,
            image_a=self.a,
            image_b=self.b,
            label=np.asarray(self.labels, dtype=np.int8),
            error=self.errors,
        )
        self._reset()
        return chunk


def _column_name(column: str) -> str:
    """A header cell as the user meant it: spaces and a byte-order mark dropped."""
    return column.strip().lstrip("\ufeff").strip()


def _check_header(columns: list[str], source: str) -> dict[str, int]:
    names = [_column_name(c) for c in columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise PairListError(
            f"{source}: missing required column(s) {', '.join(missing)}; found {names[:20]}"
        )
    dupes = {c for c in names if names.count(c) > 1 and c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
    if dupes:
        raise PairListError(f"{source}: column(s) {sorted(dupes)} appear more than once")
    return {name: i for i, name in enumerate(names) if name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}


def _iter_csv(path: Path, chunk_rows: int, source: str) -> Iterator[PairChunk]:
    start_line = 1  # first line of the record being read
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise PairListError(f"{source}: the file is empty (no header line)") from None
            cols = _check_header(header, source)
            builder = _ChunkBuilder(has_label="label" in cols)
            width = len(header)
            ia, ib = cols["image_a"], cols["image_b"]
            ip, il = cols.get("pair_id"), cols.get("label")
            while True:
                start_line = reader.line_num + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    if reader.line_num != start_line or "field limit" in str(exc):
                        # a quote opened and not closed on its line: the reader swallowed
                        # the lines after it, so rows would vanish; reject the list
                        raise
                    # confined to one line: the reader dropped its rest and goes on
                    pid = f"line-{start_line}"  # its own id is unknown
                    builder.add(pid, "", "", None, f"{MALFORMED} at line {start_line}: {exc}")
                    continue
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                err = ""
                if len(fields) != width:
                    err = f"line {reader.line_num}: expected {width} fields, got {len(fields)}"
                    fields = (fields + [""] * width)[:width]

                def get(i: int | None, row: list[str] = fields) -> str | None:
                    return None if i is None else row[i]

                builder.add(get(ip), get(ia), get(ib), get(il), err)
                if len(builder) >= chunk_rows:
                    yield builder.flush()
            if len(builder):
                yield builder.flush()
            _check_not_empty(builder, source)
    except UnicodeDecodeError as exc:
        offset, line = _first_bad_utf8(path)
        raise PairListError(
            f"{source}: not UTF-8 text ({exc.reason} at byte {offset}, line {line})"
        ) from exc
    except csv.Error as exc:
        reader_line = reader.line_num if reader is not None else start_line
        where = (
            f"line {start_line}"
            if reader_line == start_line
            else f"a quoted field opened at line {start_line} is not closed on its line"
        )
        raise PairListError(f"{source}: {MALFORMED}: {exc} ({where})") from exc


def _check_not_empty(builder: _ChunkBuilder, source: str) -> None:
    if builder.next_row == 0:
        raise PairListError(f"{source}: the list has a header but no rows")


def _text_or_none(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return repr(value)[:80]
    return value  # numbers etc.: resolve_ref marks them invalid


def _iter_parquet(path: Path, chunk_rows: int, source: str) -> Iterator[PairChunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise PairListError(f"{source}: not a readable Parquet file: {exc}") from exc
    cols = _check_header(pf.schema_arrow.names, source)
    names = [pf.schema_arrow.names[i] for i in cols.values()]
    builder = _ChunkBuilder(has_label="label" in cols)
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=names):
            data = {_column_name(n): batch.column(n).to_pylist() for n in names}
            n = batch.num_rows
            ids = data.get("pair_id", [None] * n)
            labels = data.get("label", [None] * n)
            for pid, a, b, lab in zip(ids, data["image_a"], data["image_b"], labels, strict=True):
                builder.add(pid, _text_or_none(a), _text_or_none(b), lab)
                if len(builder) >= chunk_rows:
                    yield builder.flush()
    except PairListError:
        raise
    except Exception as exc:
        raise PairListError(f"{source}: Parquet data cannot be read: {exc}") from exc
    if len(builder):
        yield builder.flush()
    _check_not_empty(builder, source)


def iter_pair_chunks(
    path: str | Path, fmt: str, chunk_rows: int = DEFAULT_CHUNK_ROWS, source: str | None = None
) -> Iterator[PairChunk]:
    """Stream a local pair-list file as :class:`PairChunk` s. Raises PairListError."""
    path = Path(path)
    source = source or path.name
    if fmt == "csv":
        yield from _iter_csv(path, chunk_rows, source)
    elif fmt == "parquet":
        yield from _iter_parquet(path, chunk_rows, source)
    else:
        raise PairListError(f"{source}: unknown pair-list format {fmt!r}")


def has_label_column(path: str | Path, fmt: str) -> bool:
    """Whether the list declares a ``label`` column (checked from the header only)."""
    if fmt == "csv":
        with open(path, encoding="utf-8-sig", newline="", errors="replace") as fh:
            header = next(csv.reader(fh), [])
        return "label" in [c.strip() for c in header]
    import pyarrow.parquet as pq

    return "label" in [n.strip() for n in pq.ParquetFile(path).schema_arrow.names]


@dataclass
class ListValidation:
    rows: int
    invalid_rows: int
    labelled: bool
    first_errors: list[str]


def validate_pair_list(
    path: str | Path, fmt: str | None = None, max_errors: int = 10
) -> ListValidation:
    """Full pass over a local list: raises PairListError, else counts bad rows."""
    path = Path(path)
    fmt = fmt or list_format(path.name)
    rows = bad = 0
    errors: list[str] = []
    for chunk in iter_pair_chunks(path, fmt):
        rows += len(chunk)
        for i, err in zip(chunk.row_index, chunk.error, strict=True):
            if err:
                bad += 1
                if len(errors) < max_errors:
                    errors.append(f"row {int(i)}: {err}")
    return ListValidation(rows, bad, has_label_column(path, fmt), errors)


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "NO_LABEL",
    "PairChunk",
    "PairListError",
    "is_pair_list",
    "iter_pair_chunks",
    "list_format",
    "list_stem",
    "validate_pair_list",
]
