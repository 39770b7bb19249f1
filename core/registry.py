"""Model registry on object storage: versions, model cards and the production pointer.

Layout (see CONTRACTS.md)::

    models/<name>/<version>/model.tar.gz    the model dir, packed reproducibly
    models/<name>/<version>/metrics.json    written LAST: its presence means "complete"
    models/<name>/<version>/model_card.md   data version, preprocessing, hyperparameters, ...
    models/<name>/<version>/roc.png         ROC curve of the test split
    models/<name>/<version>/promotion.json  the champion/challenger decision, both figures
    models/<name>/production.json           pointer to the promoted version

Every object is published with one ``put_bytes`` (atomic on both storages), so a crash
can never leave a half-written pointer: readers see the old pointer or the new one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.storage import ObjectNotFound, Storage, StorageError

logger = logging.getLogger(__name__)

ARTIFACT = "model.tar.gz"
METRICS = "metrics.json"
MODEL_CARD = "model_card.md"
ROC_PNG = "roc.png"
PROMOTION = "promotion.json"
POINTER = "production.json"


class RegistryError(RuntimeError):
    """A registry object is missing or malformed."""


def model_prefix(name: str) -> str:
    if not name or "/" in name or name.startswith(("_", ".")):
        raise ValueError(f"invalid model name {name!r}")
    return f"models/{name}/"


def version_prefix(name: str, version: str) -> str:
    return f"{model_prefix(name)}{version}/"


def pointer_key(name: str) -> str:
    return f"{model_prefix(name)}{POINTER}"


# ---------------------------------------------------------------- packing


def pack_model_dir(model_dir: str | Path) -> bytes:
    """``model_dir`` as a gzipped tar whose bytes depend only on the files' contents.

    Members are sorted, owners and mtimes zeroed and the gzip header carries no
    timestamp, so packing the same model twice gives the same bytes (and version hash).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise RegistryError(f"model dir {root} does not exist")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel.split("/"):
                continue
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            elif path.is_dir():
                tar.addfile(info)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def unpack_model_archive(data: bytes, dest: str | Path) -> Path:
    """Extract a ``model.tar.gz`` into ``dest`` (refusing links and paths outside it)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def new_version(archive: bytes, now: datetime | None = None) -> str:
    """``20261204T203000Z-ab12cd``: sortable UTC time + a short hash of the artifact."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{hashlib.sha256(archive).hexdigest()[:6]}"


# ---------------------------------------------------------------- model card and ROC


# model card fields shown first, in this order, under "Provenance"
_CARD_PROVENANCE = (
    "kind",
    "data_version",
    "backend",
    "git_commit",
    "trained_at",
    "train_seconds",
    "training_job",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return str(value)


def render_model_card(
    name: str, version: str, metrics: Mapping[str, Any], card_fields: Mapping[str, Any]
) -> str:
    """A short markdown card: what the model is, what it was trained on, how well it does."""
    lines = [f"# Model card: {name} {version}", ""]
    lines += ["## Provenance", "", "| field | value |", "|---|---|"]
    for key in _CARD_PROVENANCE:
        if key in card_fields:
            lines.append(f"| {key} | {_fmt(card_fields[key])} |")
    for key, value in card_fields.items():
        if key not in _CARD_PROVENANCE and key not in ("hyperparameters", "preprocessing"):
            lines.append(f"| {key} | {_fmt(value)} |")
    for section in ("hyperparameters", "preprocessing"):
        values = card_fields.get(section) or {}
        lines += ["", f"## {section.capitalize()}", ""]
        if values:
            lines += ["| name | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(values.items())]
        else:
            lines.append("(none recorded)")
    lines += ["", "## Metrics (identity-disjoint test split; threshold fitted on val)", ""]
    lines += ["| metric | value |", "|---|---|"]
    test = metrics.get("test", metrics)
    for key in ("accuracy", "auc", "tar_at_far_1e-2", "tar_at_far_1e-3", "threshold", "n_pairs"):
        if key in test:
            lines.append(f"| {key} | {_fmt(test[key])} |")
    view2 = metrics.get("view2")
    if isinstance(view2, Mapping) and view2:
        lines += ["", "## LFW View 2 (10 folds, unrestricted, no outside data)", ""]
        lines += ["| metric | value |", "|---|---|"]
        for key, value in view2.items():
            if not isinstance(value, list | dict):
                lines.append(f"| {key} | {_fmt(value)} |")
    lines += [
        "",
        "## Intended use",
        "",
        "Face verification (same person or not) on aligned, LFW-like photos. Not for "
        "identification against large galleries or for decisions about people without "
        "human review; LFW is dominated by public figures and is not demographically "
        "balanced.",
        "",
    ]
    return "\n".join(lines)


def roc_of(metrics: Mapping[str, Any]) -> dict[str, list] | None:
    """The ROC points in a metrics dict (top level or under ``test``), if any."""
    for holder in (metrics, metrics.get("test") or {}):
        roc = holder.get("roc") if isinstance(holder, Mapping) else None
        if isinstance(roc, Mapping) and roc.get("fpr"):
            return {"fpr": list(roc["fpr"]), "tpr": list(roc["tpr"])}
    return None


def plot_roc_curves(curves: Mapping[str, Mapping[str, Any]], title: str = "ROC") -> bytes:
    """One PNG with a ROC curve per label (``{label: {"fpr": [...], "tpr": [...]}}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    try:
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        for label, roc in curves.items():
            if roc and roc.get("fpr"):
                ax.plot(roc["fpr"], roc["tpr"], linewidth=1.5, label=label)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(title)
        if curves:
            ax.legend(loc="lower right", fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- register / read


def _put_json(storage: Storage, key: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True).encode()
    storage.put_bytes(key, data, "application/json")


def _get_json(storage: Storage, key: str) -> Any:
    raw = storage.get_bytes(key)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{storage.url_for(key)} is not valid JSON: {exc}") from exc


def register_version(
    storage: Storage,
    name: str,
    model_dir: str | Path,
    metrics: Mapping[str, Any],
    card_fields: Mapping[str, Any],
    *,
    archive: bytes | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    now: datetime | None = None,
) -> str:
    """Publish a trained model under a new version and return the version.

    ``archive`` is the packed ``model_dir`` when the caller already has it (a SageMaker
    job's ``model.tar.gz``); otherwise ``model_dir`` is packed here. ``extra_files``
    (e.g. ``{"eigenfaces.png": ...}``) are stored next to the artifact. ``metrics.json``
    goes last, so a version without it is an unfinished upload.
    """
    archive = archive if archive is not None else pack_model_dir(model_dir)
    version = new_version(archive, now)
    prefix = version_prefix(name, version)
    storage.put_bytes(prefix + ARTIFACT, archive, "application/gzip")
    card = render_model_card(name, version, metrics, card_fields)
    storage.put_bytes(prefix + MODEL_CARD, card.encode(), "text/markdown")
    roc = roc_of(metrics)
    if roc:
        png = plot_roc_curves({f"{name} {version}": roc}, title=f"{name} ROC (test split)")
        storage.put_bytes(prefix + ROC_PNG, png, "image/png")
    for filename, data in (extra_files or {}).items():
        storage.put_bytes(prefix + filename, data)
    record = {**metrics, "name": name, "version": version, "card": dict(card_fields)}
    model_json = Path(model_dir) / "model.json"
    if model_json.is_file():  # the threshold and kind the artifact itself will use
        model_meta = json.loads(model_json.read_text())
        record["model"] = {k: model_meta.get(k) for k in ("kind", "threshold", "embedding_dim")}
    _put_json(storage, prefix + METRICS, record)
    return version


def list_versions(storage: Storage, name: str) -> list[str]:
    """Complete versions (those with a metrics.json), oldest first."""
    prefix = model_prefix(name)
    out = set()
    for key in storage.list_keys(prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] == METRICS and not parts[0].startswith("_"):
            out.add(parts[0])
    return sorted(out)


def get_metrics(storage: Storage, name: str, version: str) -> dict[str, Any]:
    return _get_json(storage, version_prefix(name, version) + METRICS)


def get_production(storage: Storage, name: str) -> dict[str, Any] | None:
    """The production pointer of ``name``, or None when nothing was promoted yet."""
    try:
        pointer = _get_json(storage, pointer_key(name))
    except ObjectNotFound:
        return None
    missing = {"name", "version", "artifact_key", "threshold"} - set(pointer)
    if missing:
        raise RegistryError(f"{storage.url_for(pointer_key(name))} lacks {sorted(missing)}")
    return pointer


def gate_figure(metrics: Mapping[str, Any], gate_metric: str) -> float:
    """The gate metric of a metrics dict: ``test.<metric>`` or a top-level ``<metric>``."""
    test = metrics.get("test")
    if isinstance(test, Mapping) and gate_metric in test:
        return float(test[gate_metric])
    if gate_metric in metrics:
        return float(metrics[gate_metric])
    raise RegistryError(f"metrics have no {gate_metric!r} (keys: {sorted(metrics)})")


def _threshold_of(metrics: Mapping[str, Any]) -> float:
    for holder in (metrics.get("model") or {}, metrics, metrics.get("test") or {}):
        if holder.get("threshold") is not None:
            return float(holder["threshold"])
    raise RegistryError(f"metrics of {metrics.get('version')} record no threshold")


def promote_if_better(
    storage: Storage,
    name: str,
    version: str,
    gate_metric: str = "accuracy",
    gate_value: float | None = None,
    *,
    champion_value: float | None = None,
    champion_value_source: str = "recorded",
    champion_version: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Champion/challenger: point production at ``version`` only if it strictly wins.

    The first model of a name is always promoted. Otherwise the challenger's
    ``gate_value`` (default: its own metrics.json figure) must be strictly greater than
    the champion's: ``champion_value`` when the caller re-evaluated the champion on the
    challenger's test pairs (the fair comparison), else the figure recorded in the
    pointer. ``champion_version`` names the version ``champion_value`` was measured on:
    when production is another version by now (a promotion landed meanwhile), that figure
    is not used. The decision with both figures is written to
    ``models/<name>/<version>/promotion.json`` and returned; a promoting decision says
    ``pointer_written: false`` until the pointer write succeeded.

    The pointer is replaced by a conditional put on the ETag it was read at, so of two
    concurrent promotions only one lands; the other decides again against the new
    champion. A retry of a call whose pointer write landed returns that same decision.
    """
    metrics = get_metrics(storage, name, version)
    own_value = gate_figure(metrics, gate_metric)  # on the full test pairs of its dataset
    if gate_value is None:
        gate_value = own_value
    when = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    for _attempt in range(5):
        current, etag = _read_pointer(storage, name)
        if current is not None and current["version"] != version:
            _settle_decision(storage, name, current["version"])
        if current is not None and current["version"] == version:
            earlier = _read_decision(storage, name, version)
            if earlier is not None and earlier.get("promoted"):  # a retry after it landed
                if not earlier.get("pointer_written", True):
                    earlier["pointer_written"] = True
                    _put_json(storage, version_prefix(name, version) + PROMOTION, earlier)
                return {**earlier, "pointer": current}
        if current is not None and champion_version not in (None, current["version"]):
            # the re-evaluated figure belongs to a champion that is no longer production;
            # a challenger figure on pairs reduced for that champion goes with it
            champion_value, champion_value_source = None, "recorded"
            gate_value = own_value
        decision, pointer = _decide(
            name, version, metrics, gate_metric, float(gate_value), float(own_value), current,
            champion_value, champion_value_source, when,
        )  # fmt: skip
        decision_key = version_prefix(name, version) + PROMOTION
        if pointer is None:
            _put_json(storage, decision_key, decision)
            return decision
        _put_json(storage, decision_key, {**decision, "pointer_written": False})
        data = json.dumps(pointer, indent=2, sort_keys=True, allow_nan=True).encode()
        if storage.put_if_match(pointer_key(name), data, etag):  # one atomic conditional put
            decision["pointer_written"] = True
            _put_json(storage, decision_key, decision)
            decision["pointer"] = pointer
            return decision
        # another promotion landed since we read the pointer: decide again against it; a
        # re-evaluated champion figure was for the old champion, so the recorded one is used
        champion_value, champion_value_source = None, "recorded"
        gate_value = own_value
    reason = f"the production pointer of {name!r} kept changing; not promoted"
    decision.update(promoted=False, reason=reason)
    _put_json(storage, version_prefix(name, version) + PROMOTION, decision)
    raise RegistryError(reason)


def _settle_decision(storage: Storage, name: str, production_version: str) -> None:
    """A run that died between its pointer write and the decision's update left
    ``pointer_written: false`` next to the production version: the pointer says it landed."""
    try:
        decision = _read_decision(storage, name, production_version)
        if decision and decision.get("promoted") and decision.get("pointer_written") is False:
            decision["pointer_written"] = True
            _put_json(storage, version_prefix(name, production_version) + PROMOTION, decision)
    except (StorageError, RegistryError) as exc:  # a record to tidy: never block a decision
        logger.warning("could not settle %s %s's promotion record: %s", name,
                       production_version, exc)  # fmt: skip


def _read_pointer(storage: Storage, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """The pointer and the ETag it was read at (None, None before the first promotion)."""
    try:
        etag = storage.head(pointer_key(name)).etag
    except ObjectNotFound:
        return None, None
    return get_production(storage, name), etag


def _read_decision(storage: Storage, name: str, version: str) -> dict[str, Any] | None:
    try:
        return dict(_get_json(storage, version_prefix(name, version) + PROMOTION))
    except (ObjectNotFound, RegistryError):
        return None


def _decide(
    name: str,
    version: str,
    metrics: Mapping[str, Any],
    gate_metric: str,
    gate_value: float,
    own_value: float,
    current: dict[str, Any] | None,
    champion_value: float | None,
    champion_value_source: str,
    when: str,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The decision record, and the new pointer when the challenger wins.

    ``gate_value`` is compared (it may be on pairs reduced for this champion); the
    pointer records ``own_value``, the figure on the full test pairs, which a later
    challenger is compared with when this champion cannot be re-evaluated."""
    decision: dict[str, Any] = {
        "name": name,
        "challenger_version": version,
        "gate_metric": gate_metric,
        "challenger_value": gate_value,
        "champion_version": current["version"] if current else None,
        "champion_recorded_value": current.get("gate_value") if current else None,
        "champion_value": None,
        "champion_value_source": None,
        "decided_at": when,
    }
    if current is None:
        promote, reason = True, "no production model yet: the first model is always promoted"
    elif current["version"] == version:
        promote, reason = False, "this version is already production"
    else:
        if champion_value is None:
            recorded = current.get("gate_value")
            if current.get("gate_metric") not in (None, gate_metric) or recorded is None:
                raise RegistryError(
                    f"production {name} {current['version']} has no recorded {gate_metric!r}; "
                    "pass champion_value (re-evaluate it) to compare"
                )
            champion_value, champion_value_source = float(recorded), "recorded"
        decision["champion_value"] = float(champion_value)
        decision["champion_value_source"] = champion_value_source
        promote = gate_value > float(champion_value)
        relation = ">" if promote else "<="
        reason = (
            f"challenger {gate_metric} {gate_value:.4f} {relation} champion "
            f"{champion_value:.4f} ({champion_value_source})"
        )
    decision.update(promoted=promote, reason=reason)
    if not promote:
        return decision, None
    pointer = {
        "name": name,
        "version": version,
        "artifact_key": version_prefix(name, version) + ARTIFACT,
        "threshold": _threshold_of(metrics),
        "kind": (metrics.get("model") or {}).get("kind") or metrics.get("card", {}).get("kind"),
        "gate_metric": gate_metric,
        "gate_value": own_value,
        "data_version": metrics.get("card", {}).get("data_version") or metrics.get("data_version"),
        "promoted_at": when,
        "previous_version": current["version"] if current else None,
    }
    return decision, pointer


# ---------------------------------------------------------------- loading


def fetch_model_dir(
    storage: Storage,
    name: str,
    version: str,
    cache_dir: str | Path,
    artifact_key: str | None = None,
) -> Path:
    """Download and extract a version's artifact into ``cache_dir/<name>/<version>/`` once.

    Extraction goes to a temporary sibling that is renamed into place, so a crash or a
    concurrent loader never sees a half-extracted model.
    """
    dest = Path(cache_dir) / name / version
    if (dest / "model.json").is_file():
        return dest
    key = artifact_key or version_prefix(name, version) + ARTIFACT
    try:
        data = storage.get_bytes(key)
    except ObjectNotFound as exc:  # not worth a retry: the registry itself is damaged
        raise RegistryError(
            f"{name} {version}: its artifact {storage.url_for(key)} is missing (deleted by "
            "hand?); promote another version or retrain"
        ) from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
    try:
        unpack_model_archive(data, tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another loader won the race (or a stale partial dir)
            if not (dest / "model.json").is_file():
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_production_model(
    storage: Storage, name: str, cache_dir: str | Path, precision: str = "float32"
) -> tuple[dict[str, Any], Any]:
    """``(pointer, embedder)`` of the production version of ``name``.

    Raises RegistryError when nothing was promoted yet.
    """
    from models.loading import load_embedder

    pointer = get_production(storage, name)
    if pointer is None:
        raise RegistryError(f"no production model for {name!r} in {storage.uri}")
    model_dir = fetch_model_dir(
        storage, name, pointer["version"], cache_dir, artifact_key=pointer["artifact_key"]
    )
    return pointer, load_embedder(model_dir, precision=precision)
