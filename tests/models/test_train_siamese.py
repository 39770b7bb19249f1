"""train_siamese.py as SageMaker runs it: a subprocess under a fake /opt/ml layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.source_dir import stage_source_dir
from tests.models.test_train_pca import REPO, check_outputs, opt_ml, sm_env  # noqa: F401


@pytest.mark.slow
def test_train_siamese_script_in_a_staged_source_dir(opt_ml, tmp_path):  # noqa: F811
    src = stage_source_dir(tmp_path / "src")
    env = sm_env(opt_ml, "siamese")
    proc = subprocess.run(
        [
            sys.executable,
            "train_siamese.py",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--filters",
            "8,16",
            "--embedding-dim",
            "16",
            "--eval-pairs",
            "60",
            "--max-train-seconds",
            "600",
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[train_siamese] epoch 2:" in proc.stdout
    model_dir = Path(env["SM_MODEL_DIR"])
    metrics = check_outputs(
        model_dir, Path(env["SM_OUTPUT_DATA_DIR"]), "siamese", Path(env["SM_CHANNEL_TRAIN"])
    )
    assert metrics["hyperparameters"]["epochs_trained"] == 2
    assert metrics["hyperparameters"]["filters"] == [8, 16]
    assert (model_dir / "model.keras").exists()
    assert (model_dir / "savedmodel" / "1" / "saved_model.pb").exists()


@pytest.mark.slow
def test_train_siamese_as_module_runs_view2(opt_ml):  # noqa: F811
    env = sm_env(opt_ml, "siamese_module")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.train_siamese",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--filters",
            "8",
            "--embedding-dim",
            "8",
            "--eval-pairs",
            "40",
            "--view2-folds",
            "2",
            "--export-savedmodel",
            "0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_outputs(
        Path(env["SM_MODEL_DIR"]),
        Path(env["SM_OUTPUT_DATA_DIR"]),
        "siamese",
        Path(env["SM_CHANNEL_TRAIN"]),
    )
    assert metrics["view2"]["n_folds"] == 2 and metrics["view2"]["folds"] == [0, 1]
    # the Siamese entry point fits each fold's threshold on the next fold's unseen people
    assert metrics["view2"]["calibration"] == "held-out"
    assert [f["calibration_fold"] for f in metrics["view2"]["per_fold"]] == [1, 2]
    assert not (Path(env["SM_MODEL_DIR"]) / "savedmodel").exists()
