"""The ``retrain`` flow: train PCA and Siamese, evaluate, register, promote, report."""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from core.settings import get_settings
from core.storage import storage_from_uri
from tasks.retrain import (
    evaluate_champion,
    git_commit,
    prepare_dataset,
    promote_model,
    publish_report,
    register_model,
    resolve_dataset,
    train_model,
)

ModelName = Literal["pca", "siamese"]
BackendName = Literal["local", "sagemaker"]
GateMetric = Literal["accuracy", "auc"]


def hyperparameters_for(
    model: str,
    *,
    run_view2: bool,
    eval_pairs: int,
    seed: int,
    pca_components: int,
    siamese_epochs: int,
    siamese_max_train_seconds: int,
    siamese_mixed_precision: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The entry point's flags (names as its argparse spells them, without ``--``);
    ``extra`` (the run's ``extra_hyperparameters`` for this model) adds or overrides."""
    common = {"view2-folds": 10 if run_view2 else 0, "eval-pairs": eval_pairs, "seed": seed}
    if model == "pca":
        own = {"n-components": pca_components, **common}
    elif model == "siamese":
        own = {
            "epochs": siamese_epochs,
            "max-train-seconds": siamese_max_train_seconds,
            "mixed-precision": int(siamese_mixed_precision),
            **common,
        }
    else:
        raise ValueError(f"unknown model {model!r}")
    if not extra:
        return own
    # one spelling per flag: both ``mixed_precision`` and ``mixed-precision`` would reach
    # SageMaker's driver, which does not say which of the two wins
    spelling = entry_point_flags(model)
    return own | {spelling.get(k, k): v for k, v in extra.items()}


# flags the champion's re-evaluation must share with the challenger: set by the flow's own
# parameters (seed, eval_pairs, view2_models), never through extra_hyperparameters
GATE_FLAGS = frozenset({"seed", "eval-pairs", "view2-folds"})


def entry_point_flags(model: str) -> dict[str, str]:
    """The hyperparameter flags the model's entry point accepts, each spelling -> its main
    one (the entry point is imported only to read its parser)."""
    from models.loading import hyperparameter_spellings

    entry = importlib.import_module(f"models.train_{model}")
    return hyperparameter_spellings(entry.build_parser())


def check_run_parameters(
    eval_pairs: int, extra_hyperparameters: dict[str, dict[str, Any]] | None
) -> None:
    """Refuse parameters that would crash a training late or make the gate unfair."""
    if eval_pairs < 2:
        raise ValueError(f"eval_pairs must be >= 2 (a same and a different pair), got {eval_pairs}")
    for model, flags in (extra_hyperparameters or {}).items():
        if model not in ("pca", "siamese"):
            raise ValueError(f"extra_hyperparameters: unknown model {model!r} (pca, siamese)")
        known = entry_point_flags(model)
        unknown = sorted(k for k in flags or {} if k not in known)
        if unknown:
            raise ValueError(
                f"extra_hyperparameters[{model!r}]: {unknown} not hyperparameters of "
                f"models/train_{model}.py (see `python -m models.train_{model} --help`)"
            )
        gate = sorted(k for k in flags or {} if k.replace("_", "-") in GATE_FLAGS)
        if gate:
            raise ValueError(
                f"extra_hyperparameters[{model!r}] sets {gate}: the champion is re-evaluated "
                "with the flow's seed and eval_pairs, so set those (and view2_models) as "
                "flow parameters"
            )


@flow(
    name="retrain",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]
)
def retrain(
    models: list[ModelName] = ["pca", "siamese"],  # noqa: B006 - Prefect needs a literal
    backend: BackendName | None = None,
    data_version: str | None = None,
    view2_models: list[ModelName] = ["pca"],  # noqa: B006 - Prefect needs a literal
    pca_components: int = 200,
    siamese_epochs: int = 20,
    siamese_max_train_seconds: int = 1800,
    siamese_mixed_precision: bool = False,
    eval_pairs: int = 2000,
    seed: int = 0,
    gate_metric: GateMetric = "accuracy",
    extra_hyperparameters: dict[str, dict[str, Any]] | None = None,
    storage_uri: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate, register and (if better) promote the face verification models.

    Args:
        models: which models to train: ``pca`` (eigenfaces/Fisherfaces) and/or
            ``siamese`` (TensorFlow CNN).
        backend: ``local`` (subprocess on the worker) or ``sagemaker`` (training jobs);
            default: the FACEREID_BACKEND setting.
        data_version: dataset version to train on (default: ``datasets/lfw/latest.json``).
        view2_models: models that also run the LFW View 2 10-fold protocol (ten extra
            trainings each: about two minutes for PCA, hours for the Siamese net on CPU).
        pca_components: number of principal components of the PCA model.
        siamese_epochs: maximum training epochs of the Siamese net.
        siamese_max_train_seconds: time budget of one Siamese training.
        siamese_mixed_precision: train the Siamese net in bfloat16 (float32 variables;
            the saved model computes in float32): faster on CPUs with native bfloat16.
        eval_pairs: same/different pairs drawn from each of the val and test splits.
        seed: seed of the training runs and of the evaluation pairs.
        gate_metric: test-split figure a new model must beat to be promoted.
        extra_hyperparameters: more flags per model for its entry point, e.g.
            ``{"siamese": {"batch-size": 64, "filters": "32,64,128"}}`` or
            ``{"pca": {"features": "pixels"}}`` for classic eigenfaces (see
            ``python models/train_<model>.py --help``).
        storage_uri: ``file://...`` or ``s3://bucket/prefix`` (default: the setting).

    Each model is registered under ``models/<name>/<version>/``; production moves only
    when the new model strictly beats the current one re-evaluated on the same pairs.
    A model whose training fails does not stop the others; the run fails at the end.
    """
    settings = get_settings()
    backend = backend or settings.backend
    storage = storage_from_uri(
        storage_uri or settings.storage_uri,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.aws_region,
    )
    wanted: list[str] = [str(m) for m in dict.fromkeys(models)]
    if not wanted:
        raise ValueError("models is empty: name at least one of pca, siamese")
    check_run_parameters(eval_pairs, extra_hyperparameters)
    manifest = resolve_dataset(storage, data_version)
    version = str(manifest["version"])
    cache_dir = settings.cache_path
    dataset_dir = prepare_dataset(storage, version, cache_dir)
    run_name = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{flow_run.get_name() or 'local'}"
    work_root = Path(tempfile.mkdtemp(prefix="retrain-", dir=_scratch(cache_dir)))
    hp: dict[str, dict[str, Any]] = {
        m: hyperparameters_for(
            m,
            run_view2=m in view2_models,
            eval_pairs=eval_pairs,
            seed=seed,
            pca_components=pca_components,
            siamese_epochs=siamese_epochs,
            siamese_max_train_seconds=siamese_max_train_seconds,
            siamese_mixed_precision=siamese_mixed_precision,
            extra=(extra_hyperparameters or {}).get(m),
        )
        for m in wanted
    }

    cancel_key = f"{flow_run.get_id() or 'local'}-{uuid.uuid4().hex}"
    # the code the trainings start from: a checkout updated during an hour-long training
    # must not relabel the model cards with the commit it reached by registration time
    commit = git_commit(Path(__file__).resolve().parent.parent)

    def submit(m: str) -> Any:
        return train_model.with_options(name=f"train-{m}").submit(
            m, backend, storage, version, dataset_dir, hp[m], work_root / m, settings, cancel_key
        )

    # SageMaker jobs run remotely: submit them all and wait together. Locally the two
    # trainings would fight over the same few cores (TensorFlow and BLAS each use all
    # of them), so they run one after the other: same total time, steadier logs.
    trained: dict[str, Any] = {}
    try:
        if backend == "sagemaker":
            trained = collect_remote_trainings(wanted, submit, cancel_key)
        else:
            for m in wanted:
                trained[m] = _outcome(submit(m))
        outcomes = _register_and_promote(
            storage,
            wanted,
            trained,
            manifest,
            backend,
            hp,
            dataset_dir,
            eval_pairs,
            seed,
            gate_metric,
            cache_dir,
            commit,
        )
    finally:
        shutil.rmtree(work_root, ignore_errors=True)  # artifacts are in the registry now

    report = publish_report(storage, run_name, version, backend, outcomes)
    summary = {
        "data_version": version,
        "backend": backend,
        "report_key": report["report_key"],
        "roc_key": report["roc_key"],
        "models": {
            m: (
                {"error": out["error"]}
                if "error" in out
                else {
                    "version": out["version"],
                    "accuracy": (out["metrics"].get("test") or out["metrics"]).get("accuracy"),
                    "auc": (out["metrics"].get("test") or out["metrics"]).get("auc"),
                    "view2": out["metrics"].get("view2"),
                    "promoted": out["decision"]["promoted"],
                    "reason": out["decision"]["reason"],
                }
            )
            for m, out in outcomes.items()
        },
    }
    failed = {m: out["error"] for m, out in outcomes.items() if "error" in out}
    if failed:
        raise RuntimeError(f"training failed for {sorted(failed)}: {failed}")
    return summary


def _register_and_promote(
    storage: Any,
    wanted: list[str],
    trained: dict[str, Any],
    manifest: dict[str, Any],
    backend: str,
    hp: dict[str, dict[str, Any]],
    dataset_dir: Path,
    eval_pairs: int,
    seed: int,
    gate_metric: str,
    cache_dir: Path,
    commit: str,
) -> dict[str, dict[str, Any]]:
    """Per trained model: re-evaluate the champion, register, promote if better."""
    logger = get_run_logger()
    version = str(manifest["version"])
    outcomes: dict[str, dict[str, Any]] = {}
    for m in wanted:
        result = trained[m]
        if isinstance(result, BaseException):
            logger.error("training %s failed: %s", m, result)
            outcomes[m] = {"error": str(result)}
            continue
        champion_state = evaluate_champion(
            storage, m, dataset_dir, eval_pairs, seed, cache_dir, result.model_dir,
            return_state=True,
        )  # fmt: skip
        champion = champion_state.result(raise_on_failure=False)
        if isinstance(champion, BaseException):
            # an unreadable champion must not block the challenger: fall back to the
            # figure recorded in the production pointer
            logger.warning(
                "re-evaluating production %s failed (%s); using its recorded figure", m, champion
            )
            champion = None
        model_meta = _model_json(result.model_dir)
        card = {
            "kind": m,
            "data_version": version,
            "backend": backend,
            "git_commit": commit,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "train_seconds": result.metrics.get("train_seconds"),
            "wall_seconds": result.wall_seconds,
            "training_job": result.job_name or "",
            "hyperparameters": model_meta.get("hyperparameters") or hp[m],
            "preprocessing": model_meta.get("preprocessing") or manifest.get("preprocessing"),
        }
        try:
            model_version = register_model(storage, result, card, datetime.now(UTC))
            decision = promote_model(storage, m, model_version, gate_metric, champion)
        except Exception as exc:  # noqa: BLE001 - reported per model, re-raised at the end
            logger.error("registering/promoting %s failed: %s", m, exc)
            outcomes[m] = {"error": f"registering/promoting failed: {exc}"}
            continue
        outcomes[m] = {
            "version": model_version,
            "metrics": result.metrics,
            "decision": decision,
            "champion": champion,
        }
    return outcomes


def _scratch(cache_dir: Path) -> Path:
    path = Path(cache_dir) / "retrain"
    path.mkdir(parents=True, exist_ok=True)
    return path


def collect_remote_trainings(
    models: list[str], submit: Callable[[str], Any], cancel_key: str, grace_s: float = 20.0
) -> dict[str, Any]:
    """Submit every model's training, then each one's outcome. If the run is cancelled
    (the signal reaches this, the main thread, only), the task threads are told to stop
    their jobs and given ``grace_s`` in all to do so (Prefect's runner kills the process
    30 s after its SIGTERM)."""
    from tasks.backends.sagemaker_training import cancel_event, forget_cancel_event

    futures: dict[str, Any] = {}
    try:
        for m in models:
            futures[m] = submit(m)
        outcomes = {m: _outcome(fut) for m, fut in futures.items()}
    except BaseException:
        # the event stays registered, set: a task the interrupt caught mid-submit (not in
        # ``futures``) still finds it set when it starts waiting, and stops its job
        cancel_event(cancel_key).set()
        deadline = time.monotonic() + grace_s
        for fut in futures.values():
            fut.wait(timeout=max(0.0, deadline - time.monotonic()))
        raise
    forget_cancel_event(cancel_key)
    return outcomes


def _outcome(future: Any) -> Any:
    """The task's result, or the exception it failed with (so other models go on)."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - reported per model, re-raised at the end
        return exc


def _model_json(model_dir: Path) -> dict[str, Any]:
    import json

    path = Path(model_dir) / "model.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    print(retrain())
