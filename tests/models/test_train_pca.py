"""train_pca.py as SageMaker runs it: a subprocess under a fake /opt/ml layout."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.loading import load_embedder, read_channel
from models.source_dir import stage_source_dir
from tests.models.synthetic import write_fake_channel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def opt_ml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("opt_ml")
    write_fake_channel(root / "input" / "data" / "train", n_people=30, per_person=5)
    return root


def sm_env(opt_ml: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update(
        SM_MODEL_DIR=str(opt_ml / name / "model"),
        SM_CHANNEL_TRAIN=str(opt_ml / "input" / "data" / "train"),
        SM_OUTPUT_DATA_DIR=str(opt_ml / name / "output" / "data"),
        PYTHONPATH="",
    )
    return env


def check_outputs(model_dir: Path, output_dir: Path, kind: str, channel: Path) -> dict:
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["kind"] == kind and meta["face_shape"] == [68, 56]
    assert meta["data_version"] == "fake0123456789ab"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics == json.loads((output_dir / "metrics.json").read_text())
    assert metrics["threshold"] == meta["threshold"] == metrics["test"]["threshold"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["train_seconds"] >= 0
    assert len(metrics["roc"]["fpr"]) == len(metrics["roc"]["tpr"]) > 1
    embedder = load_embedder(model_dir)
    assert embedder.kind == kind and embedder.threshold == pytest.approx(meta["threshold"])
    data = read_channel(channel)
    emb = embedder.embed(data.faces[:4])
    assert emb.shape == (4, meta["embedding_dim"]) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    return metrics


def test_train_pca_as_module_from_repo_root(opt_ml):
    env = sm_env(opt_ml, "module")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.train_pca",
            "--n_components",
            "20",
            "--lda",
            "true",
            "--view2-folds",
            "10",
            "--eval-pairs",
            "60",
            "--unknown-flag",
            "x",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[train_pca] threshold" in proc.stdout and "View 2:" in proc.stdout
    metrics = check_outputs(
        Path(env["SM_MODEL_DIR"]),
        Path(env["SM_OUTPUT_DATA_DIR"]),
        "pca",
        Path(env["SM_CHANNEL_TRAIN"]),
    )
    assert metrics["view2"]["n_folds"] == 10 and metrics["accuracy"] > 0.8
    assert metrics["view2"]["calibration"] == "other-folds"  # the PCA entry point's default
    assert metrics["hyperparameters"]["view2_calibration"] == "other-folds"
    assert metrics["hyperparameters"]["n_components"] == 20
    assert (Path(env["SM_MODEL_DIR"]) / "pca.npz").exists()


def test_train_pca_as_script_in_a_staged_source_dir(opt_ml, tmp_path):
    src = stage_source_dir(tmp_path / "src")
    assert {p.name for p in src.iterdir()} >= {
        "train_pca.py",
        "train_siamese.py",
        "requirements.txt",
        "models",
    }
    assert not list(src.rglob("__pycache__"))
    env = sm_env(opt_ml, "script")
    proc = subprocess.run(
        [
            sys.executable,
            "train_pca.py",
            "--n-components",
            "15",
            "--view2-folds",
            "0",
            "--eval-pairs",
            "40",
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = check_outputs(
        Path(env["SM_MODEL_DIR"]),
        Path(env["SM_OUTPUT_DATA_DIR"]),
        "pca",
        Path(env["SM_CHANNEL_TRAIN"]),
    )
    assert metrics["view2"] is None


def test_models_package_imports_nothing_from_the_orchestration_layers():
    for path in (REPO / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("flows", "tasks", "core") for n in names), path
