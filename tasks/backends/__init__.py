"""Where training runs: ``local`` (subprocess, SageMaker-like layout) or ``sagemaker``.

Both take the same script-mode entry point (``train_<model>.py`` from the staged source
dir, see models/source_dir.py) and the same hyperparameters, and return a
:class:`TrainingResult`: the extracted model dir, its packed ``model.tar.gz`` and the
metrics the script wrote. Plain Python only; tasks/retrain.py wraps them in Prefect tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("local", "sagemaker")
MODELS = ("pca", "siamese")


class TrainingError(RuntimeError):
    """A training run did not produce a model (non-zero exit, failed or stopped job)."""


@dataclass
class TrainingResult:
    model: str
    backend: str
    model_dir: Path
    archive: bytes
    metrics: dict[str, Any]
    job_name: str | None = None
    wall_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def entry_script(model: str) -> str:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return f"train_{model}.py"


def hyperparameter_value(value: Any) -> str:
    """How SageMaker's script driver renders a hyperparameter on the command line.

    Strings pass through, everything else is JSON (``True`` -> ``true``, ``300`` ->
    ``300``), so the local backend hands the script exactly what a SageMaker job would.
    """
    return value if isinstance(value, str) else json.dumps(value)


def hyperparameters_to_cli_args(hyperparameters: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in hyperparameters.items():
        args += [f"--{key}", hyperparameter_value(value)]
    return args


def read_metrics(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        raise TrainingError(f"training finished but wrote no metrics.json in {model_dir}")
    return json.loads(path.read_text())
