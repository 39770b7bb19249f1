"""Registry: versions, model card, ROC, champion/challenger and the atomic pointer."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from core import registry
from core.storage import LocalStorage, StorageError

T0 = datetime(2026, 12, 4, 20, 30, 0, tzinfo=UTC)


def make_model_dir(
    root: Path, accuracy: float, n_components: int = 4, seed: int = 0
) -> tuple[Path, dict]:
    """A real PCA model dir (fitted on random faces) plus its metrics."""
    from models.loading import write_model_json
    from models.pca import PCAEmbedder

    rng = np.random.default_rng(seed)
    faces = rng.normal(size=(24, 68, 56)).astype(np.float32)
    labels = np.repeat(np.arange(6), 4).astype(str)
    model = PCAEmbedder(n_components=n_components, lda=False).fit(faces, labels)
    model.save(root)
    write_model_json(root, "pca", 0.42, model.embedding_dim_, {"n_components": n_components})
    roc = {"fpr": [0.0, 0.1, 1.0], "tpr": [0.0, 0.8, 1.0]}
    metrics = {
        "kind": "pca",
        "threshold": 0.42,
        "accuracy": accuracy,
        "auc": 0.9,
        "roc": roc,
        "test": {"accuracy": accuracy, "auc": 0.9, "threshold": 0.42, "roc": roc},
        "train_seconds": 1.5,
    }
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root, metrics


CARD = {
    "kind": "pca",
    "data_version": "0123456789abcdef",
    "backend": "local",
    "git_commit": "abc123",
    "trained_at": "2026-12-04T20:30:00+00:00",
    "train_seconds": 1.5,
    "hyperparameters": {"n_components": 4},
    "preprocessing": {"height": 68, "width": 56},
}


def test_pack_is_reproducible_and_round_trips(tmp_path: Path) -> None:
    model_dir, _ = make_model_dir(tmp_path / "m", 0.8)
    a = registry.pack_model_dir(model_dir)
    (model_dir / "model.json").touch()  # new mtime, same bytes
    b = registry.pack_model_dir(model_dir)
    assert a == b
    out = registry.unpack_model_archive(a, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert (out / "pca.npz").read_bytes() == (model_dir / "pca.npz").read_bytes()


def test_register_writes_artifact_metrics_card_and_roc(any_storage, tmp_path: Path) -> None:
    model_dir, metrics = make_model_dir(tmp_path / "m", 0.8)
    version = registry.register_version(
        any_storage, "pca", model_dir, metrics, CARD, extra_files={"eigenfaces.png": b"png"}, now=T0
    )
    archive = registry.pack_model_dir(model_dir)
    assert version.startswith("20261204T203000Z-") and len(version) == len("20261204T203000Z-") + 6
    assert version == registry.new_version(archive, T0)  # the hash is the artifact's
    prefix = f"models/pca/{version}/"
    keys = {i.key for i in any_storage.list(prefix)}
    assert keys == {
        prefix + k
        for k in ("model.tar.gz", "metrics.json", "model_card.md", "roc.png", "eigenfaces.png")
    }
    assert any_storage.get_bytes(prefix + "model.tar.gz") == archive
    assert any_storage.get_bytes(prefix + "roc.png").startswith(b"\x89PNG")
    stored = json.loads(any_storage.get_bytes(prefix + "metrics.json"))
    assert stored["accuracy"] == 0.8 and stored["version"] == version
    assert stored["model"] == {"kind": "pca", "threshold": 0.42, "embedding_dim": 3 * 4}  # 3 maps
    card = any_storage.get_bytes(prefix + "model_card.md").decode()
    for needle in ("0123456789abcdef", "abc123", "| backend | local |", "n_components", "0.8000"):
        assert needle in card
    assert registry.list_versions(any_storage, "pca") == [version]


def test_first_model_is_promoted_then_only_strictly_better(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    assert registry.get_production(storage, "pca") is None

    good_dir, good = make_model_dir(tmp_path / "good", 0.80, seed=1)
    v1 = registry.register_version(storage, "pca", good_dir, good, CARD, now=T0)
    d1 = registry.promote_if_better(storage, "pca", v1)
    assert d1["promoted"] and "first model" in d1["reason"]
    pointer = registry.get_production(storage, "pca")
    assert pointer["version"] == v1
    assert pointer["artifact_key"] == f"models/pca/{v1}/model.tar.gz"
    assert pointer["threshold"] == 0.42 and pointer["gate_value"] == 0.80
    assert pointer["data_version"] == "0123456789abcdef"

    worse_dir, worse = make_model_dir(tmp_path / "worse", 0.75, seed=2)
    v2 = registry.register_version(storage, "pca", worse_dir, worse, CARD, now=T0)
    d2 = registry.promote_if_better(storage, "pca", v2)
    assert not d2["promoted"]
    assert (d2["challenger_value"], d2["champion_value"]) == (0.75, 0.80)
    assert registry.get_production(storage, "pca")["version"] == v1

    equal_dir, equal = make_model_dir(tmp_path / "equal", 0.80, seed=3)
    v3 = registry.register_version(storage, "pca", equal_dir, equal, CARD, now=T0)
    assert not registry.promote_if_better(storage, "pca", v3)["promoted"]  # ties keep the champion

    # the re-evaluated champion figure wins over the recorded one
    better_dir, better = make_model_dir(tmp_path / "better", 0.79, seed=4)
    v4 = registry.register_version(storage, "pca", better_dir, better, CARD, now=T0)
    d4 = registry.promote_if_better(
        storage, "pca", v4, champion_value=0.70, champion_value_source="re-evaluated"
    )
    assert d4["promoted"] and d4["champion_recorded_value"] == 0.80
    assert d4["champion_value"] == 0.70
    pointer = registry.get_production(storage, "pca")
    assert pointer["version"] == v4 and pointer["previous_version"] == v1

    # every decision is stored next to its version, with both figures
    stored = json.loads(storage.get_bytes(f"models/pca/{v2}/promotion.json"))
    assert stored["promoted"] is False and stored["champion_version"] == v1
    assert stored["challenger_value"] == 0.75 and stored["champion_value"] == 0.80


def test_tampered_gate_figure_is_what_the_gate_sees(tmp_path: Path) -> None:
    """Without a re-evaluation, the recorded production figure is the bar to beat."""
    storage = LocalStorage(tmp_path / "store")
    d1, m1 = make_model_dir(tmp_path / "a", 0.80, seed=1)
    v1 = registry.register_version(storage, "pca", d1, m1, CARD, now=T0)
    registry.promote_if_better(storage, "pca", v1)
    pointer = registry.get_production(storage, "pca")
    storage.put_bytes(
        "models/pca/production.json", json.dumps({**pointer, "gate_value": 0.99}).encode()
    )
    d2, m2 = make_model_dir(tmp_path / "b", 0.95, seed=2)
    v2 = registry.register_version(storage, "pca", d2, m2, CARD, now=T0)
    decision = registry.promote_if_better(storage, "pca", v2)
    assert not decision["promoted"] and decision["champion_value"] == 0.99


def test_pointer_is_always_whole_json_under_concurrent_promotions(tmp_path: Path) -> None:
    """Readers racing many pointer writes only ever see a complete pointer."""
    storage = LocalStorage(tmp_path / "store")
    versions = []
    for i in range(6):
        d, m = make_model_dir(tmp_path / f"m{i}", 0.5 + i * 0.05, seed=i)
        versions.append(registry.register_version(storage, "pca", d, m, CARD, now=T0))
    registry.promote_if_better(storage, "pca", versions[0])
    stop = threading.Event()
    seen: list[str] = []
    errors: list[Exception] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(registry.get_production(storage, "pca")["version"])
            except Exception as exc:  # a torn write would show up here
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for v in versions[1:]:
        registry.promote_if_better(storage, "pca", v)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(seen)) > 1 and set(seen) <= set(versions)  # reads spanned the writes
    assert registry.get_production(storage, "pca")["version"] == versions[-1]


def test_load_production_model_downloads_once_and_embeds(any_storage, tmp_path: Path) -> None:
    with pytest.raises(registry.RegistryError, match="no production model"):
        registry.load_production_model(any_storage, "pca", tmp_path / "cache")
    d, m = make_model_dir(tmp_path / "m", 0.8)
    v = registry.register_version(any_storage, "pca", d, m, CARD, now=T0)
    registry.promote_if_better(any_storage, "pca", v)

    pointer, embedder = registry.load_production_model(any_storage, "pca", tmp_path / "cache")
    assert pointer["version"] == v
    assert (tmp_path / "cache" / "pca" / v / "model.json").is_file()
    assert embedder.kind == "pca" and embedder.threshold == pytest.approx(0.42)
    faces = np.random.default_rng(0).normal(size=(3, 68, 56)).astype(np.float32)
    emb = embedder.embed(faces)
    assert emb.shape == (3, 3 * 4)  # 3 feature maps x 4 components
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    # a second load uses the cache: it works even with the artifact gone from storage
    any_storage.delete(pointer["artifact_key"])
    pointer2, embedder2 = registry.load_production_model(any_storage, "pca", tmp_path / "cache")
    np.testing.assert_allclose(embedder2.embed(faces), emb, rtol=1e-6)
    # without the cache, the deleted artifact is a registry error (not retried as I/O)
    with pytest.raises(registry.RegistryError, match="artifact .* is missing"):
        registry.load_production_model(any_storage, "pca", tmp_path / "empty-cache")


def test_malformed_pointer_is_a_clear_error(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put_bytes("models/pca/production.json", b'{"name": "pca"')
    with pytest.raises(registry.RegistryError, match="not valid JSON"):
        registry.get_production(storage, "pca")
    storage.put_bytes("models/pca/production.json", b'{"name": "pca"}')
    with pytest.raises(registry.RegistryError, match="lacks"):
        registry.get_production(storage, "pca")


def test_incomplete_versions_are_not_listed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put_bytes("models/pca/20260101T000000Z-aaaaaa/model.tar.gz", b"partial upload")
    assert registry.list_versions(storage, "pca") == []


def test_roc_plot_of_several_curves_is_a_png() -> None:
    png = registry.plot_roc_curves(
        {"a": {"fpr": [0, 0.5, 1], "tpr": [0, 0.9, 1]}, "b": {"fpr": [0, 1], "tpr": [0, 1]}}
    )
    assert png.startswith(b"\x89PNG")


def test_promotion_is_a_compare_and_swap(any_storage, tmp_path: Path, monkeypatch) -> None:
    """Two challengers that both read the old champion: only a real winner stands."""
    storage = any_storage
    champ_dir, champ = make_model_dir(tmp_path / "champ", 0.70, seed=1)
    v1 = registry.register_version(storage, "pca", champ_dir, champ, CARD, now=T0)
    registry.promote_if_better(storage, "pca", v1)
    a_dir, a = make_model_dir(tmp_path / "a", 0.90, seed=2)
    va = registry.register_version(storage, "pca", a_dir, a, CARD, now=T0)
    b_dir, b = make_model_dir(tmp_path / "b", 0.80, seed=3)
    vb = registry.register_version(storage, "pca", b_dir, b, CARD, now=T0)

    # b reads the pointer (champion 0.70, so b would win) and a's promotion lands just
    # before b's conditional write: injected at the storage layer, nothing of the
    # registry is replaced
    real_put_if_match = storage.put_if_match
    pointer_writes: list[bool] = []

    def a_lands_first(key, data, etag, *args, **kwargs):
        if key == registry.pointer_key("pca") and not pointer_writes:
            storage.put_if_match = real_put_if_match
            assert registry.promote_if_better(storage, "pca", va)["promoted"]
        landed = real_put_if_match(key, data, etag, *args, **kwargs)
        pointer_writes.append(landed)
        return landed

    monkeypatch.setattr(storage, "put_if_match", a_lands_first)
    d = registry.promote_if_better(storage, "pca", vb)
    monkeypatch.undo()
    assert pointer_writes == [False]  # b's write on the stale ETag was refused
    assert not d["promoted"] and d["champion_version"] == va and d["champion_value"] == 0.90
    assert registry.get_production(storage, "pca")["version"] == va

    # a retried call after its pointer write landed reports the same promotion
    again = registry.promote_if_better(storage, "pca", va)
    assert again["promoted"] and again["pointer"]["version"] == va


def registered(
    storage: LocalStorage, tmp_path: Path, label: str, accuracy: float, seed: int
) -> str:
    """A version of a tiny PCA model with this test accuracy, registered (not promoted)."""
    model_dir, metrics = make_model_dir(tmp_path / label, accuracy, seed=seed)
    return registry.register_version(storage, "pca", model_dir, metrics, CARD, now=T0)


def test_a_reevaluated_figure_is_only_used_against_its_own_champion(tmp_path: Path) -> None:
    """Run X re-evaluated champion A; run Y promoted a better B meanwhile: X's challenger
    must beat B's figure, not A's (it would otherwise replace a better model)."""
    storage = LocalStorage(tmp_path / "store")
    va = registered(storage, tmp_path, "a", 0.70, seed=1)
    registry.promote_if_better(storage, "pca", va)
    vb = registered(storage, tmp_path, "b", 0.90, seed=2)
    assert registry.promote_if_better(storage, "pca", vb)["promoted"]  # run Y
    vx = registered(storage, tmp_path, "x", 0.80, seed=3)
    d = registry.promote_if_better(  # run X: A re-evaluated at 0.72, X at 0.95 on the people
        storage, "pca", vx, gate_value=0.95, champion_value=0.72,  # pairs left after A's
        champion_value_source="re-evaluated", champion_version=va,
    )  # fmt: skip
    assert not d["promoted"]
    assert (d["champion_version"], d["champion_value"], d["champion_value_source"]) == (
        vb, 0.90, "recorded"
    )  # fmt: skip
    # B's recorded figure is on the full pairs: so is X's, not the one reduced for A
    assert d["challenger_value"] == 0.80
    assert registry.get_production(storage, "pca")["version"] == vb
    # against the champion it was measured on, the re-evaluated figure is the bar
    vy = registered(storage, tmp_path, "y", 0.89, seed=4)
    d = registry.promote_if_better(  # Y scored 0.87 on the pairs reduced for B
        storage, "pca", vy, gate_value=0.87, champion_value=0.85,
        champion_value_source="re-evaluated", champion_version=vb,
    )  # fmt: skip
    assert d["promoted"] and (d["challenger_value"], d["champion_value"]) == (0.87, 0.85)
    # the pointer records Y's full-pairs figure: the bar when Y cannot be re-evaluated
    assert registry.get_production(storage, "pca")["gate_value"] == 0.89


def test_a_promotion_whose_pointer_write_failed_is_not_recorded_as_done(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "store")
    v1 = registered(storage, tmp_path, "a", 0.70, seed=1)
    registry.promote_if_better(storage, "pca", v1)
    v2 = registered(storage, tmp_path, "b", 0.90, seed=2)

    def outage(*_args, **_kwargs):
        raise StorageError("endpoint unreachable")

    monkeypatch.setattr(storage, "put_if_match", outage)
    with pytest.raises(StorageError):
        registry.promote_if_better(storage, "pca", v2)
    monkeypatch.undo()
    stored = json.loads(storage.get_bytes(f"models/pca/{v2}/promotion.json"))
    assert stored["promoted"] is True and stored["pointer_written"] is False
    assert registry.get_production(storage, "pca")["version"] == v1
    retried = registry.promote_if_better(storage, "pca", v2)  # the task's retry
    assert retried["promoted"] and retried["pointer_written"] is True
    assert registry.get_production(storage, "pca")["version"] == v2
    stored = json.loads(storage.get_bytes(f"models/pca/{v2}/promotion.json"))
    assert stored["pointer_written"] is True


def test_a_run_that_died_after_its_pointer_write_is_settled_by_the_next(tmp_path, monkeypatch):
    """The pointer landed, then the process died before promotion.json said so: the next
    promotion decision of that name records that the pointer was written."""
    storage = LocalStorage(tmp_path / "store")
    v1 = registered(storage, tmp_path, "a", 0.70, seed=1)
    registry.promote_if_better(storage, "pca", v1)
    v2 = registered(storage, tmp_path, "b", 0.90, seed=2)
    put_if_match = storage.put_if_match

    def write_then_die(*args, **kwargs):
        assert put_if_match(*args, **kwargs)
        raise SystemExit("worker killed")

    monkeypatch.setattr(storage, "put_if_match", write_then_die)
    with pytest.raises(SystemExit):
        registry.promote_if_better(storage, "pca", v2)
    monkeypatch.undo()
    assert registry.get_production(storage, "pca")["version"] == v2
    decision_key = f"models/pca/{v2}/promotion.json"
    assert json.loads(storage.get_bytes(decision_key))["pointer_written"] is False
    v3 = registered(storage, tmp_path, "c", 0.60, seed=3)
    assert not registry.promote_if_better(storage, "pca", v3)["promoted"]
    assert json.loads(storage.get_bytes(decision_key))["pointer_written"] is True
