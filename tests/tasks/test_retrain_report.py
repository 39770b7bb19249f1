"""The run report names how each View 2 figure's threshold was fitted."""

from __future__ import annotations

from pathlib import Path

from core.storage import storage_from_uri
from tasks.retrain import render_report


def outcome(version: str, view2: dict | None) -> dict:
    metrics = {"test": {"accuracy": 0.8, "auc": 0.9}, "threshold": 0.3, "view2": view2}
    decision = {"promoted": True, "reason": "first model"}
    return {"version": version, "metrics": metrics, "decision": decision}


def test_report_names_the_view2_calibration(tmp_path: Path) -> None:
    storage = storage_from_uri(f"file://{tmp_path}")
    outcomes = {
        "siamese": outcome(
            "s1", {"accuracy_mean": 0.915, "accuracy_se": 0.004, "calibration": "held-out"}
        ),
        "pca": outcome("p1", None),
    }
    report = render_report("run", storage, "v", "local", outcomes, None)
    siamese_row = next(line for line in report.splitlines() if line.startswith("| siamese |"))
    pca_row = next(line for line in report.splitlines() if line.startswith("| pca |"))
    assert "91.50 % ± 0.40 % (held-out threshold)" in siamese_row
    assert "not run" in pca_row
    # metrics written before the option existed were the other-folds protocol
    old = {"pca": outcome("p0", {"accuracy_mean": 0.8065, "accuracy_se": 0.0062})}
    assert "(other-folds threshold)" in render_report("run", storage, "v", "local", old, None)
