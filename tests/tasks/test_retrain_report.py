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


def test_report_shows_the_challenger_on_the_pairs_it_was_compared_on(tmp_path: Path) -> None:
    """After a re-split the gate compares both models without the people the champion
    trained on: the report shows that challenger figure next to the champion's, not only
    the full-pairs one."""
    storage = storage_from_uri(f"file://{tmp_path}")
    out = outcome("c2", None)
    out["champion"] = {
        "version": "c1",
        "test": {"accuracy": 0.71, "auc": 0.8},
        "threshold": 0.4,
        "left_out_people": 12,
        "challenger_test": {"accuracy": 0.74, "auc": 0.83},
    }
    rows = render_report("run", storage, "v", "local", {"pca": out}, None).splitlines()
    reduced = next(r for r in rows if r.startswith("| pca (without the 12 people"))
    assert "`c2`" in reduced and "74.00 %" in reduced
    champion = next(r for r in rows if r.startswith("| pca (production)"))
    assert "71.00 %" in champion
    assert rows.index(reduced) < rows.index(champion)
