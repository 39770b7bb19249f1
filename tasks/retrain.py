"""Prefect tasks of the retrain flow: thin wrappers over tasks.backends and core.registry.

Retries only where I/O can fail transiently (storage reads/writes). Training itself is
never retried blindly: a failed script or SageMaker job fails its task with the reason.
"""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from core import registry
from core.dataset import latest_version, read_manifest
from core.storage import Storage
from tasks.backends import TrainingResult
from tasks.io_retries import io_task

REPORTS_PREFIX = "models/_reports/"


IO_TASK = io_task(delay_s=2)


def git_commit(cwd: Path | None = None) -> str:
    """The checkout's commit (``+dirty`` when it has local changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@task(name="resolve-dataset", **IO_TASK)
def resolve_dataset(storage: Storage, data_version: str | None) -> dict[str, Any]:
    """The manifest of the requested (default: latest) complete dataset version."""
    version = data_version or latest_version(storage)
    manifest = read_manifest(storage, version)
    get_run_logger().info(
        "training on dataset %s (%s images)",
        manifest["version"],
        manifest.get("counts", {}).get("images"),
    )
    return manifest


@task(name="prepare-dataset", **IO_TASK)
def prepare_dataset(storage: Storage, version: str, cache_dir: Path) -> Path:
    """A local copy of the dataset prefix (the local storage itself, or downloaded once)."""
    from tasks.backends.local import materialise_dataset

    return materialise_dataset(storage, version, cache_dir)


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(
    model: str,
    backend: str,
    storage: Storage,
    data_version: str,
    dataset_dir: Path | None,
    hyperparameters: dict[str, Any],
    work_dir: Path,
    settings: Any,
    cancel_key: str | None = None,
) -> TrainingResult:
    """Train one model on the chosen backend; its output streams into this task's log.

    ``cancel_key``: the flow's key for :func:`cancel_event`, which stops a SageMaker job
    whose wait this task thread is in."""
    logger = get_run_logger()
    log = logger.info
    if backend == "local":
        from tasks.backends.local import train_locally

        assert dataset_dir is not None
        return train_locally(
            model,
            dataset_dir,
            hyperparameters,
            work_dir,
            log=log,
            timeout_s=settings.local_training_timeout_s,
        )
    if backend == "sagemaker":
        from tasks.backends.sagemaker_training import (
            cancel_event,
            instance_type_for,
            train_on_sagemaker,
        )

        return train_on_sagemaker(
            model,
            storage,
            data_version,
            hyperparameters,
            work_dir,
            role_arn=settings.sagemaker_role_arn,
            instance_type=instance_type_for(model, settings),
            region=settings.aws_region,
            timeout_s=settings.sagemaker_job_timeout_s,
            endpoints={"s3": settings.s3_endpoint_url},
            log=log,
            cancel=cancel_event(cancel_key) if cancel_key else None,
        )
    raise ValueError(f"unknown backend {backend!r}; expected local or sagemaker")


def champion_seen_people(
    storage: Storage, champion_data_version: str | None, data_version: str
) -> set[str]:
    """People the champion trained on or fitted its threshold on (its dataset's train and
    val splits), when it was trained on another dataset version than ``data_version``.

    Another version may deal people to other splits (another seed or fractions): such
    people in this run's val/test pairs would flatter the champion. Same version: none."""
    if not champion_data_version or champion_data_version == data_version:
        return set()
    from core.dataset import read_faces

    table = read_faces(storage, champion_data_version, ["person", "split"])
    persons, splits = table.column("person").to_pylist(), table.column("split").to_pylist()
    return {p for p, s in zip(persons, splits, strict=True) if s != "test"}


@task(name="evaluate-champion", **IO_TASK)
def evaluate_champion(
    storage: Storage,
    name: str,
    dataset_dir: Path,
    eval_pairs: int,
    seed: int,
    cache_dir: Path,
    challenger_dir: Path | None = None,
) -> dict[str, Any] | None:
    """Score the production model on the challenger's val/test pairs (None if no champion).

    Same pairs (same dataset, ``eval_pairs`` and ``seed``), same procedure (threshold
    fitted on val, reported on test): the gate compares like with like even when the
    champion was evaluated on another dataset version when it was promoted. When that
    version split the people differently, the people the champion trained on are left
    out of the pairs, and the challenger (``challenger_dir``) is re-scored on the same
    reduced pairs (``challenger_test``), so neither figure is flattered.
    """
    from models.evaluation import evaluate_candidate
    from models.loading import load_embedder, read_channel

    if registry.get_production(storage, name) is None:
        return None
    pointer, embedder = registry.load_production_model(storage, name, cache_dir)
    data = read_channel(dataset_dir)
    seen = champion_seen_people(storage, pointer.get("data_version"), data.version)
    keep = np.array([p not in seen for p in data.persons.tolist()], dtype=bool)
    left_out = sorted(set(data.persons[~keep & (data.splits != "train")].tolist()))

    def evaluate(model: Any) -> dict[str, Any]:
        return evaluate_candidate(
            model,
            data.faces[keep],
            data.image_ids[keep].tolist(),
            data.splits[keep].tolist(),
            data.persons[keep].tolist(),
            n_pairs=eval_pairs,
            seed=seed,
        )

    evaluation = evaluate(embedder)
    logger = get_run_logger()
    logger.info(
        "champion %s %s re-evaluated: test accuracy %.4f (recorded at promotion: %s)",
        name,
        pointer["version"],
        evaluation["test"]["accuracy"],
        pointer.get("gate_value"),
    )
    out = {
        "version": pointer["version"],
        "data_version": pointer.get("data_version"),
        "recorded_value": pointer.get("gate_value"),
        "test": evaluation["test"],
        "threshold": evaluation["threshold"],
        "left_out_people": len(left_out),
    }
    if left_out:
        if challenger_dir is None:
            raise ValueError("the champion saw some of these val/test people: pass challenger_dir")
        out["challenger_test"] = evaluate(load_embedder(challenger_dir))["test"]
        logger.info(
            "%d val/test people were in the champion's training data (%s): both models "
            "scored without them; challenger test accuracy %.4f",
            len(left_out),
            pointer.get("data_version"),
            out["challenger_test"]["accuracy"],
        )
    return out


def eigenfaces_png(model_dir: Path, n: int = 16) -> bytes:
    """Mean and leading eigenfaces of a PCA model dir's first feature map, as a PNG grid."""
    from core.reports import face_grid
    from models.loading import read_model_json
    from models.pca import PCAEmbedder

    shape = tuple(read_model_json(model_dir).get("face_shape") or (68, 56))
    model = PCAEmbedder.load(model_dir)
    faces = np.concatenate([model.mean_face()[None], model.eigenfaces(n - 1)]).reshape(-1, *shape)
    titles = ["mean"] + [f"#{i + 1}" for i in range(len(faces) - 1)]
    return face_grid(faces, titles, cols=8)


@task(name="register-model", **IO_TASK)
def register_model(
    storage: Storage,
    result: TrainingResult,
    card_fields: dict[str, Any],
    registered_at: datetime,
) -> str:
    """Publish the model under ``models/<name>/<version>/`` (retries rewrite the same keys)."""
    extra: dict[str, bytes] = {}
    if result.model == "pca":
        extra["eigenfaces.png"] = eigenfaces_png(result.model_dir)
    version = registry.register_version(
        storage,
        result.model,
        result.model_dir,
        result.metrics,
        card_fields,
        archive=result.archive,
        extra_files=extra,
        now=registered_at,
    )
    get_run_logger().info(
        "registered %s %s at %s",
        result.model,
        version,
        storage.url_for(registry.version_prefix(result.model, version)),
    )
    return version


@task(name="promote-if-better", **IO_TASK)
def promote_model(
    storage: Storage,
    name: str,
    version: str,
    gate_metric: str,
    champion: dict[str, Any] | None,
) -> dict[str, Any]:
    """Champion/challenger gate; the decision is stored next to the version."""
    champion_value = champion_version = gate_value = None
    source = "recorded"
    if champion is not None:
        champion_value = float(champion["test"][gate_metric])
        champion_version = champion["version"]
        source = f"re-evaluated on this run's test pairs (data {champion.get('data_version')})"
        if champion.get("challenger_test"):
            gate_value = float(champion["challenger_test"][gate_metric])
            source += (
                f" without the {champion['left_out_people']} val/test people it trained on;"
                " the challenger re-scored on the same pairs"
            )
    decision = registry.promote_if_better(
        storage,
        name,
        version,
        gate_metric,
        gate_value,
        champion_value=champion_value,
        champion_value_source=source,
        champion_version=champion_version,
    )
    get_run_logger().info(
        "%s %s: %s - %s",
        name,
        version,
        "PROMOTED" if decision["promoted"] else "not promoted",
        decision["reason"],
    )
    return decision


def _pct(value: Any) -> str:
    try:
        return f"{100 * float(value):.2f} %"
    except (TypeError, ValueError):
        return "n/a"


def _num(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "n/a"


def render_report(
    run_name: str,
    storage: Storage,
    data_version: str,
    backend: str,
    outcomes: dict[str, dict[str, Any]],
    roc_key: str | None,
) -> str:
    """The markdown run report: metrics table, ROC link, eigenfaces, promotion decisions."""
    lines = [
        f"# Retrain report: {run_name}",
        "",
        f"Dataset `{data_version}` · backend `{backend}` · storage `{storage.uri}`",
        "",
        "| model | version | test accuracy | test AUC | TAR@FAR=1e-2 | threshold "
        "| View 2 accuracy (± SE) | train s | promoted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, out in outcomes.items():
        if "error" in out:
            lines.append(f"| {name} | failed | | | | | | | {out['error'][:120]} |")
            continue
        m = out["metrics"]
        test = m.get("test") or m
        view2 = m.get("view2") or {}
        v2 = (
            f"{_pct(view2.get('accuracy_mean'))} ± {_pct(view2.get('accuracy_se'))}"
            f" ({view2.get('calibration', 'other-folds')} threshold)"
            if view2
            else "not run"
        )
        promoted = "**yes**" if out["decision"]["promoted"] else "no"
        lines.append(
            f"| {name} | `{out['version']}` | {_pct(test.get('accuracy'))} | "
            f"{_num(test.get('auc'))} | {_pct(test.get('tar_at_far_1e-2'))} | "
            f"{_num(m.get('threshold'))} | {v2} | {_num(m.get('train_seconds'))} | {promoted} |"
        )
        champion = out.get("champion")
        if champion and champion.get("challenger_test"):  # compared on reduced pairs
            reduced = champion["challenger_test"]
            lines.append(
                f"| {name} (without the {champion['left_out_people']} people production "
                f"trained on) | `{out['version']}` | {_pct(reduced.get('accuracy'))} | "
                f"{_num(reduced.get('auc'))} | {_pct(reduced.get('tar_at_far_1e-2'))} "
                "| | | | |"
            )
        if champion:
            lines.append(
                f"| {name} (production) | `{champion['version']}` | "
                f"{_pct(champion['test'].get('accuracy'))} | {_num(champion['test'].get('auc'))} "
                f"| {_pct(champion['test'].get('tar_at_far_1e-2'))} | "
                f"{_num(champion.get('threshold'))} | | | champion |"
            )
    lines += ["", "## ROC curves (test split)", ""]
    if roc_key:
        lines.append(f"![ROC curves]({storage.url_for(roc_key)})")
        lines.append(f"\nPNG: `{storage.url_for(roc_key)}`")
    else:
        lines.append("(no ROC points)")
    for name, out in outcomes.items():
        if "version" in out and name == "pca":
            key = registry.version_prefix(name, out["version"]) + "eigenfaces.png"
            lines += ["", "## Eigenfaces (PCA)", "", f"![eigenfaces]({storage.url_for(key)})"]
            lines.append(f"\nPNG: `{storage.url_for(key)}`")
    lines += ["", "## Promotion decisions", ""]
    for name, out in outcomes.items():
        if "decision" in out:
            d = out["decision"]
            verdict = "promoted to production" if d["promoted"] else "kept the current production"
            lines.append(f"- **{name}** `{out['version']}`: {verdict} — {d['reason']}")
        else:
            lines.append(f"- **{name}**: not trained — {out.get('error', 'unknown error')}")
    return "\n".join(lines) + "\n"


@task(name="publish-report", **IO_TASK)
def publish_report(
    storage: Storage,
    run_name: str,
    data_version: str,
    backend: str,
    outcomes: dict[str, dict[str, Any]],
) -> dict[str, str]:
    """ROC PNG (challengers + champions) and the markdown report, stored and as an artifact."""
    curves: dict[str, Any] = {}
    for name, out in outcomes.items():
        if "metrics" in out:
            roc = registry.roc_of(out["metrics"])
            if roc:
                curves[f"{name} {out['version']} (new)"] = roc
        champion = out.get("champion")
        if champion:
            roc = registry.roc_of(champion["test"])
            if roc:
                curves[f"{name} {champion['version']} (production)"] = roc
    prefix = f"{REPORTS_PREFIX}{run_name}/"
    roc_key = None
    if curves:
        roc_key = prefix + "roc.png"
        storage.put_bytes(roc_key, registry.plot_roc_curves(curves, "ROC, test split"), "image/png")
    markdown = render_report(run_name, storage, data_version, backend, outcomes, roc_key)
    report_key = prefix + "report.md"
    storage.put_bytes(report_key, markdown.encode(), "text/markdown")
    create_markdown_artifact(
        markdown=markdown, key="retrain-report", description=f"Retrain {run_name}"
    )
    return {"report_key": report_key, "roc_key": roc_key or ""}
