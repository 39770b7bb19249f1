"""``model_name="auto"``: verify with the promoted model that has the best gate figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import registry
from core.registry import RegistryError
from core.storage import LocalStorage
from tasks.verify import choose_model_name
from tests.core.test_registry import CARD, T0, make_model_dir


def _promote(storage: LocalStorage, tmp_path: Path, name: str, accuracy: float) -> None:
    model_dir, metrics = make_model_dir(tmp_path / name, accuracy)
    version = registry.register_version(storage, name, model_dir, metrics, CARD, now=T0)
    assert registry.promote_if_better(storage, name, version)["promoted"]


def test_auto_picks_the_best_promoted_model(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    with pytest.raises(RegistryError, match="no promoted model"):
        choose_model_name(storage, "auto")
    _promote(storage, tmp_path, "pca", 0.81)
    assert choose_model_name(storage, "auto") == "pca"
    _promote(storage, tmp_path, "siamese", 0.89)
    _promote(storage, tmp_path, "other", 0.70)
    assert choose_model_name(storage, "auto") == "siamese"
    assert choose_model_name(storage, "pca") == "pca"  # a name is taken as given
