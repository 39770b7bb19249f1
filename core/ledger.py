"""The processed ledger and the "announced" markers, kept as small objects in storage.

A list is identified by its key *and* its ETag, so an edited list (new ETag) is processed
again while an unchanged one never is. Entries are written with ``put_if_absent`` (an
atomic conditional create), so two concurrent runs cannot both record the same list, and a
re-run after a crash between "results published" and "ledger written" simply writes the
entry it missed.

Layout::

    processed/<list key>/<etag>.json    done: run id, result keys, model, counts
    events/announced/<list key>/<etag>.json   the poller emitted an event for this version
    rejected/<name>  +  rejected/<name>.error.json   lists that could not be parsed
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from core.pairlists import is_pair_list
from core.storage import ObjectInfo, ObjectNotFound, valid_key

log = logging.getLogger(__name__)

INCOMING = "incoming/"
PROCESSED = "processed/"
ANNOUNCED = "events/announced/"
REJECTED = "rejected/"

_SAFE = re.compile(r"[^A-Za-z0-9._\-]")


class ListVersionGone(Exception):
    """The listed version of a pair list was deleted or replaced before it was handled.

    Not an error of the run: the next run sees whatever is under the key by then."""


def _etag_part(etag: str) -> str:
    return _SAFE.sub("_", etag.strip('"')) or "noetag"


def ledger_key(list_key: str, etag: str) -> str:
    return f"{PROCESSED}{list_key}/{_etag_part(etag)}.json"


def announced_key(list_key: str, etag: str) -> str:
    return f"{ANNOUNCED}{list_key}/{_etag_part(etag)}.json"


def is_processed(storage: Any, list_key: str, etag: str) -> bool:
    return bool(storage.exists(ledger_key(list_key, etag)))


def read_entry(storage: Any, list_key: str, etag: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get_bytes(ledger_key(list_key, etag)))
    except ObjectNotFound:
        return None


def record_processed(storage: Any, list_key: str, etag: str, entry: dict[str, Any]) -> bool:
    """Write the ledger entry once; False when it already existed (a concurrent/earlier run)."""
    body = {"list_key": list_key, "etag": etag, **entry}
    body.setdefault("recorded_at", datetime.now(UTC).isoformat())
    data = json.dumps(body, indent=2, sort_keys=True, default=str).encode()
    return bool(storage.put_if_absent(ledger_key(list_key, etag), data))


def mark_announced(storage: Any, list_key: str, etag: str) -> bool:
    """True the first time a list version is announced, False ever after."""
    data = json.dumps(
        {
            "list_key": list_key,
            "etag": etag,
            "announced_at": datetime.now(UTC).isoformat(),
            "poller": uuid.uuid4().hex,  # the body is this poller's alone (see S3Storage._holds)
        }
    ).encode()
    return bool(storage.put_if_absent(announced_key(list_key, etag), data))


def incoming_lists(storage: Any, prefix: str = INCOMING) -> list[ObjectInfo]:
    """Every pair list under ``incoming/``, oldest first (ties broken by key).

    A key no storage call accepts (``..`` or empty segments, which S3 allows) is skipped
    with a warning, so one odd upload cannot stop every later run."""
    infos = []
    for info in storage.list(prefix):
        if not is_pair_list(info.key):
            continue
        if not valid_key(info.key):
            log.warning("skipping %r: not a valid object key (.. or empty segments)", info.key)
            continue
        infos.append(info)
    return sorted(infos, key=lambda i: (i.last_modified, i.key))


def pending_lists(storage: Any, prefix: str = INCOMING) -> Iterator[ObjectInfo]:
    """Lists whose current version has no ledger entry, oldest first.

    The ledger is listed once (a LIST call per 1,000 entries on S3) rather than looked up
    per list, so a poll every few minutes stays cheap however many lists were verified."""
    recorded = set(storage.list_keys(PROCESSED + prefix))
    for info in incoming_lists(storage, prefix):
        if ledger_key(info.key, info.etag) not in recorded:
            yield info


def rejected_key(list_key: str, etag: str | None = None) -> str:
    """``rejected/<name>``; with ``etag``, ``rejected/<name>.<etag>`` followed by the
    list's own suffix (``night.csv`` -> ``night.<etag>.csv``), for a name taken already."""
    name = list_key[len(INCOMING) :] if list_key.startswith(INCOMING) else list_key
    if etag is None:
        return f"{REJECTED}{name}"
    stem, dot, suffix = name.rpartition(".")
    return f"{REJECTED}{stem}.{_etag_part(etag)}.{suffix}" if dot else f"{REJECTED}{name}"


def _rejected_report(storage: Any, dest: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get_bytes(dest + ".error.json"))
    except (ObjectNotFound, ValueError):
        return None


def reject_list(
    storage: Any, info: ObjectInfo, error: str, run_context: dict[str, Any] | None = None
) -> str:
    """Move an unparseable list to ``rejected/<name>`` with ``<name>.error.json`` beside it.

    The report is written first and the original deleted last, so a crash leaves the list
    in ``incoming/`` (it is rejected again next run) rather than losing it. Only the version
    ``info`` names is moved: if the key is gone or holds a new version, ListVersionGone
    (a new upload is never deleted); an earlier rejected version is never overwritten.
    """
    dest = rejected_key(info.key)
    earlier = _rejected_report(storage, dest)
    if earlier is not None and earlier.get("etag") != info.etag:
        dest = rejected_key(info.key, info.etag)
    try:
        current = storage.head(info.key).etag
    except ObjectNotFound as exc:
        report = _rejected_report(storage, dest)
        if report is not None and report.get("etag") == info.etag:
            return dest  # this version was moved already (a retried call)
        raise ListVersionGone(f"{info.key} is gone; nothing to reject") from exc
    if current != info.etag:
        raise ListVersionGone(f"{info.key} holds a new version ({current}); left for next run")
    report = {
        "list_key": info.key,
        "etag": info.etag,
        "size": info.size,
        "rejected_key": dest,
        "error": error,
        "rejected_at": datetime.now(UTC).isoformat(),
        **(run_context or {}),
    }
    try:
        storage.copy(info.key, dest)
    except ObjectNotFound as exc:  # deleted since the check above
        raise ListVersionGone(f"{info.key} is gone; nothing to reject") from exc
    storage.put_bytes(
        dest + ".error.json", json.dumps(report, indent=2).encode(), "application/json"
    )
    try:
        if storage.head(info.key).etag == info.etag:  # not replaced while we copied
            storage.delete(info.key)
    except ObjectNotFound:
        pass  # deleted meanwhile: nothing left to remove
    return dest
