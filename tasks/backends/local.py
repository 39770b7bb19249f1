"""Local backend: run a script-mode entry point as a subprocess under a fake ``/opt/ml``.

The layout and environment mirror what a SageMaker training container sees::

    <work>/opt_ml/code/                      the staged source dir (cwd of the script)
    <work>/opt_ml/input/data/train/          the dataset prefix (faces/, protocol/, manifest)
    <work>/opt_ml/input/config/hyperparameters.json
    <work>/opt_ml/input/config/resourceconfig.json
    <work>/opt_ml/model/                     SM_MODEL_DIR, packed into model.tar.gz after
    <work>/opt_ml/output/data/               SM_OUTPUT_DATA_DIR

so a script that passes here runs unchanged in a SageMaker job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.registry import pack_model_dir
from tasks.backends import (
    TrainingError,
    TrainingResult,
    entry_script,
    hyperparameters_to_cli_args,
    read_metrics,
)

LOG_TAIL_LINES = 40
DATASET_FILES = ("manifest.json",)
DATASET_DIRS = ("faces/", "protocol/")


def materialise_dataset(storage: Any, version: str, cache_dir: Path) -> Path:
    """A local directory holding the dataset prefix ``datasets/lfw/v=<version>/``.

    A local storage already is one (used in place); an S3 dataset is downloaded once into
    ``cache_dir/datasets/lfw/v=<version>/`` (complete when its manifest.json is there,
    which is fetched last, like the ingest flow writes it last).
    """
    prefix = f"datasets/lfw/v={version}/"
    root = getattr(storage, "root", None)
    if root is not None:
        local = Path(root) / prefix
        if not (local / "manifest.json").is_file():
            raise FileNotFoundError(f"dataset {storage.url_for(prefix)} is not complete")
        return local
    dest = Path(cache_dir) / prefix
    if (dest / "manifest.json").is_file():
        return dest
    keys = [
        key
        for sub in DATASET_DIRS
        for key in storage.list_keys(prefix + sub)
        if key.endswith(".parquet")
    ]
    if not storage.exists(prefix + "manifest.json"):
        raise FileNotFoundError(f"dataset {storage.url_for(prefix)} is not complete")
    for key in [*keys, prefix + "manifest.json"]:
        target = dest / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        # a temp name of its own: two runs preparing the same version must not collide
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(storage.get_bytes(key))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def layout_opt_ml(
    work_dir: Path, dataset_dir: Path, hyperparameters: dict[str, Any], source_dir: Path
) -> dict[str, Path]:
    """Create the SageMaker-like directory tree; returns its named paths."""
    base = Path(work_dir) / "opt_ml"
    if base.exists():
        shutil.rmtree(base)
    paths = {
        "base": base,
        "code": base / "code",
        "train": base / "input" / "data" / "train",
        "config": base / "input" / "config",
        "model": base / "model",
        "output": base / "output",
        "output_data": base / "output" / "data",
    }
    for key in ("config", "model", "output_data"):
        paths[key].mkdir(parents=True)
    paths["train"].parent.mkdir(parents=True)
    paths["train"].symlink_to(Path(dataset_dir).resolve(), target_is_directory=True)
    shutil.copytree(source_dir, paths["code"])
    (paths["config"] / "hyperparameters.json").write_text(
        json.dumps(
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()}
        )
    )
    (paths["config"] / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]})
    )
    return paths


def sagemaker_env(
    paths: dict[str, Path], hyperparameters: dict[str, Any], script: str
) -> dict[str, str]:
    """The ``SM_*`` variables a SageMaker training container sets."""
    env = {
        "SM_MODEL_DIR": str(paths["model"]),
        "SM_CHANNEL_TRAIN": str(paths["train"]),
        "SM_CHANNELS": json.dumps(["train"]),
        "SM_OUTPUT_DIR": str(paths["output"]),
        "SM_OUTPUT_DATA_DIR": str(paths["output_data"]),
        "SM_INPUT_DIR": str(paths["base"] / "input"),
        "SM_INPUT_CONFIG_DIR": str(paths["config"]),
        "SM_HPS": json.dumps(hyperparameters),
        "SM_USER_ENTRY_POINT": script,
        "SM_MODULE_DIR": str(paths["code"]),
        "SM_CURRENT_HOST": "algo-1",
        "SM_HOSTS": json.dumps(["algo-1"]),
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in hyperparameters.items():
        env[f"SM_HP_{key.upper().replace('-', '_')}"] = (
            value if isinstance(value, str) else json.dumps(value)
        )
    return env


def run_streaming(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    log: Callable[[str], None],
    timeout_s: float | None,
) -> tuple[int, list[str]]:
    """Run ``cmd``, passing each output line to ``log`` as it comes; (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            proc.kill()

        watchdog = threading.Timer(timeout_s, kill) if timeout_s else None
        if watchdog:
            watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log(line)
            code = proc.wait()
        except BaseException:  # e.g. the log call failing: the script goes too (a cancelled
            # run's worker kills the whole process group, this script included)
            proc.kill()
            raise
        finally:
            if watchdog:
                watchdog.cancel()
        if fired.is_set():
            tail.append(f"[local backend] killed after the {timeout_s:.0f}s timeout")
    return code, list(tail)


def train_locally(
    model: str,
    dataset_dir: Path,
    hyperparameters: dict[str, Any],
    work_dir: Path,
    *,
    source_dir: Path | None = None,
    log: Callable[[str], None] = print,
    python: str = sys.executable,
    timeout_s: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> TrainingResult:
    """Train ``model`` with its entry point in a subprocess; return the packed result."""
    from models.source_dir import stage_source_dir

    script = entry_script(model)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if source_dir is None:
        source_dir = stage_source_dir(work_dir / "source")
    paths = layout_opt_ml(work_dir, dataset_dir, hyperparameters, source_dir)
    env = {**os.environ, **sagemaker_env(paths, hyperparameters, script), **(extra_env or {})}
    env.pop("PYTHONPATH", None)  # the source dir must be self-contained, as in a container
    cmd = [python, "-u", script, *hyperparameters_to_cli_args(hyperparameters)]
    log(f"[local backend] {' '.join(cmd)} (cwd {paths['code']})")
    started = time.monotonic()
    code, tail = run_streaming(cmd, paths["code"], env, log, timeout_s)
    wall = time.monotonic() - started
    if code != 0:
        raise TrainingError(
            f"{script} exited with code {code} after {wall:.0f}s; last lines:\n" + "\n".join(tail)
        )
    metrics = read_metrics(paths["model"])
    archive = pack_model_dir(paths["model"])
    (paths["output"] / "model.tar.gz").write_bytes(archive)
    return TrainingResult(
        model=model,
        backend="local",
        model_dir=paths["model"],
        archive=archive,
        metrics=metrics,
        wall_seconds=round(wall, 2),
        details={"command": cmd, "work_dir": str(work_dir)},
    )
