"""The pair-list chores behind ``facereid drop`` and ``facereid results``.

``drop_pair_list`` parses the whole list locally first (the same parser the flow uses),
so a list that the flow would reject never reaches ``incoming/``.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

from core.ledger import INCOMING, is_processed, read_entry
from core.pairlists import is_pair_list, list_format, list_stem, validate_pair_list
from core.storage import ObjectNotFound, valid_key


def incoming_key(local_path: Path, name: str | None = None) -> str:
    """``incoming/<name>``; ``name`` may hold sub-folders but never ``..`` or a leading /."""
    name = (name or local_path.name).strip()
    norm = posixpath.normpath(name)
    if not name or name.startswith("/") or norm != name or ".." in name.split("/"):
        raise ValueError(f"invalid list name {name!r}: use a relative name like team/list.csv")
    if not is_pair_list(name):
        raise ValueError(f"list name {name!r} must end in .csv, .parquet or .pq")
    return INCOMING + name


def check_results_folder_free(storage: Any, key: str) -> None:
    """Refuse ``night.csv`` while ``night.parquet`` is in incoming/: both would write to
    ``results/night/`` and ``facereid results night`` could return the other's results."""
    stem = list_stem(key)
    for other in lists_with_stem(storage, stem):
        if other != key:
            raise FileExistsError(
                f"{storage.url_for(other)} already writes its results to results/{stem}/; "
                "name this list differently (--name)"
            )


def lists_with_stem(storage: Any, stem: str) -> list[str]:
    """Keys of the pair lists in ``incoming/`` whose results folder is ``results/<stem>/``
    (``night.csv`` and ``night.parquet`` share one), listed without reading them."""
    folder = INCOMING + (stem.rsplit("/", 1)[0] + "/" if "/" in stem else "")
    return [
        k
        for k in storage.list_keys(folder)
        if "/" not in k[len(folder) :] and is_pair_list(k) and list_stem(k) == stem
    ]


def drop_pair_list(
    storage: Any, local_path: Path | str, name: str | None = None, force: bool = False
) -> str:
    """Validate a local pair list, then upload it to ``incoming/<name>``; returns the key.

    Raises ValueError (PairListError) when the list cannot be parsed or named. Lists
    with some bad rows are uploaded: those rows get status ``invalid_row`` in the results.
    Raises FileExistsError rather than replace a list under that name that no run has
    verified yet (it would never be verified); ``force`` replaces it anyway.
    """
    local_path = Path(local_path)
    if not local_path.is_file():
        raise ValueError(f"{local_path} is not a file")
    key = incoming_key(local_path, name)
    report = validate_pair_list(local_path, list_format(key))  # no rows: PairListError
    check_results_folder_free(storage, key)
    content_type = "text/csv" if key.endswith(".csv") else "application/vnd.apache.parquet"
    if force:
        storage.put_bytes(key, local_path.read_bytes(), content_type)
    else:
        unverified = FileExistsError(
            f"{storage.url_for(key)} holds a list no run has verified yet; replacing it "
            "means it is never verified. Wait for the next run, pick another name, or "
            "pass --force."
        )
        try:
            current = storage.head(key)
        except ObjectNotFound:
            current = None
        if current is not None and not is_processed(storage, key, current.etag):
            raise unverified
        # conditional on what was checked: of two drops racing to one name, one lands and
        # the other is refused, instead of silently replacing the first
        etag = current.etag if current else None
        if not storage.put_if_match(key, local_path.read_bytes(), etag, content_type):
            raise unverified
    if is_processed(storage, key, storage.head(key).etag):
        stem = key[len(INCOMING) :].rsplit(".", 1)[0]
        print(
            f"note: this exact content of {key} was verified already, so no run verifies it "
            f"again (results: facereid results {stem}); to verify it with the current model, "
            "drop it under another name (--name)"
        )
    if report.invalid_rows:
        print(
            f"warning: {report.invalid_rows} of {report.rows} rows are invalid and will be "
            f"reported as invalid_row; first: {report.first_errors[:3]}"
        )
    return key


def latest_result_key(storage: Any, list_stem: str) -> str:
    """Key of the newest ``results/<list_stem>/<run-id>.parquet`` (a list in a sub-folder
    of ``incoming/`` keeps it: ``incoming/team/night.csv`` -> stem ``team/night``)."""
    list_stem = _check_stem(list_stem)
    prefix = f"results/{list_stem}/"
    found = [
        i
        for i in storage.list(prefix)
        if i.key.endswith(".parquet") and "/" not in i.key[len(prefix) :]  # not a sub-list's
    ]
    if not found:
        raise FileNotFoundError(f"no results for {list_stem!r} under {storage.url_for('results/')}")
    return max(found, key=lambda i: (i.last_modified, i.key)).key


def _check_stem(list_stem: str) -> str:
    list_stem = list_stem.strip("/")
    if not list_stem or not valid_key(list_stem) or list_stem == ".":
        raise ValueError(f"invalid list stem {list_stem!r}")
    return list_stem


def current_result_key(storage: Any, stem: str) -> tuple[str, str | None]:
    """The results of the list now in ``incoming/`` under this stem, as its ledger entry
    names them, else the newest results, with a note saying why.

    Newest alone can be wrong: re-dropping an earlier version's exact bytes is not verified
    again (the ledger has it), so the newest results belong to another version; two runs
    verifying one version leave two results files, and the ledger names the one that counts.
    """
    stem = _check_stem(stem)
    lists = lists_with_stem(storage, stem)
    note = None
    if len(lists) == 1:
        try:
            entry = read_entry(storage, lists[0], storage.head(lists[0]).etag)
        except ObjectNotFound:  # removed since the listing: as if never there
            entry = None
        result_key = (entry or {}).get("result_key")
        if result_key and storage.exists(result_key):
            return result_key, None
        note = (
            f"{lists[0]} has not been verified in its current version yet; these are "
            "the newest results, of an earlier version"
            if entry is None
            else f"the results the ledger names for {lists[0]} are gone; these are the newest"
        )
    elif len(lists) > 1:
        note = (
            f"{len(lists)} lists in incoming/ share the stem {stem!r} "
            f"({', '.join(lists)}); these are the newest results of any of them"
        )
    return latest_result_key(storage, stem), note


def fetch_latest_results(storage: Any, list_stem: str, dest: Path | str) -> Path:
    """Download the results of a list's current version (the newest results when the
    ledger has none for it; a note says so) into ``dest``: Parquet + CSV twin.

    Returns the local Parquet path; the CSV lands beside it.
    """
    list_stem = _check_stem(list_stem)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    key, note = current_result_key(storage, list_stem)
    if note:
        print(f"note: {note}")
    run_id = key.rsplit("/", 1)[-1].removesuffix(".parquet")
    out = dest / f"{list_stem.replace('/', '_')}-{run_id}.parquet"
    out.write_bytes(storage.get_bytes(key))
    csv_key = key.removesuffix(".parquet") + ".csv"
    if storage.exists(csv_key):
        out.with_suffix(".csv").write_bytes(storage.get_bytes(csv_key))
    return out
