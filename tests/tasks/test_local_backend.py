"""Local backend: real entry points as subprocesses under a fake ``/opt/ml`` layout."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from core.registry import unpack_model_archive
from tasks.backends import TrainingError, hyperparameters_to_cli_args
from tasks.backends.local import materialise_dataset, train_locally


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models.synthetic import write_fake_channel

    return write_fake_channel(tmp_path_factory.mktemp("channel") / "ds", n_people=20, per_person=4)


def test_hyperparameters_render_like_sagemakers_driver() -> None:
    args = hyperparameters_to_cli_args(
        {"n-components": 30, "whiten": True, "lda": "auto", "x": 0.5}
    )
    assert args == ["--n-components", "30", "--whiten", "true", "--lda", "auto", "--x", "0.5"]


def test_train_pca_runs_under_fake_opt_ml(channel: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    result = train_locally(
        "pca",
        channel,
        {"n-components": 10, "view2-folds": 2, "eval-pairs": 60, "lda": "false"},
        tmp_path / "work",
        log=lines.append,
    )
    opt_ml = tmp_path / "work" / "opt_ml"
    assert result.backend == "local" and result.model_dir == opt_ml / "model"
    assert {"model.json", "pca.npz", "metrics.json"} <= {p.name for p in result.model_dir.iterdir()}
    # metrics: what the script wrote, also in output/data like SageMaker's output.tar.gz
    assert result.metrics == json.loads((opt_ml / "output" / "data" / "metrics.json").read_text())
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert result.metrics["hyperparameters"]["n_components"] == 10
    assert len(result.metrics["view2"]["folds"]) == 2
    hps = json.loads((opt_ml / "input" / "config" / "hyperparameters.json").read_text())
    assert hps == {"n-components": "10", "view2-folds": "2", "eval-pairs": "60", "lda": "false"}
    # the script's output was streamed line by line
    assert lines[0].startswith("[local backend]") and "train_pca.py --n-components 10" in lines[0]
    assert any(line.startswith("[train_pca] fitting PCA") for line in lines)
    # the packed artifact is the model dir and loads back as an embedder
    from models.loading import load_embedder

    unpacked = unpack_model_archive(result.archive, tmp_path / "unpacked")
    embedder = load_embedder(unpacked)
    assert embedder.kind == "pca"
    assert embedder.threshold == pytest.approx(result.metrics["threshold"])
    faces = np.random.default_rng(0).normal(size=(2, 68, 56)).astype(np.float32)
    assert embedder.embed(faces).shape == (2, 3 * 10)  # 3 feature maps x 10 components


def write_script(source: Path, body: str) -> Path:
    source.mkdir(parents=True, exist_ok=True)
    (source / "train_pca.py").write_text(textwrap.dedent(body))
    return source


def test_failing_script_raises_with_log_tail(channel: Path, tmp_path: Path) -> None:
    source = write_script(
        tmp_path / "src",
        """
        import sys
        for i in range(100):
            print(f"step {i}")
        print("ValueError: the data is cursed", file=sys.stderr)
        sys.exit(3)
        """,
    )
    with pytest.raises(TrainingError) as err:
        train_locally("pca", channel, {}, tmp_path / "work", source_dir=source, log=lambda _: None)
    message = str(err.value)
    assert "train_pca.py exited with code 3" in message
    assert "ValueError: the data is cursed" in message and "step 99" in message
    assert "step 0\n" not in message  # only the tail


def test_script_sees_sagemaker_environment(channel: Path, tmp_path: Path) -> None:
    source = write_script(
        tmp_path / "src",
        """
        import json, os, sys
        from pathlib import Path
        model_dir = Path(os.environ["SM_MODEL_DIR"])
        seen = {k: v for k, v in os.environ.items() if k.startswith("SM_")}
        seen["argv"] = sys.argv[1:]
        seen["cwd"] = os.getcwd()
        seen["channel_files"] = sorted(os.listdir(os.environ["SM_CHANNEL_TRAIN"]))
        (model_dir / "metrics.json").write_text(json.dumps(seen))
        """,
    )
    result = train_locally(
        "pca", channel, {"epochs": 2, "fast": True}, tmp_path / "work", source_dir=source
    )
    seen = result.metrics
    opt_ml = tmp_path / "work" / "opt_ml"
    assert seen["SM_MODEL_DIR"] == str(opt_ml / "model")
    assert seen["SM_CHANNEL_TRAIN"] == str(opt_ml / "input" / "data" / "train")
    assert seen["SM_OUTPUT_DATA_DIR"] == str(opt_ml / "output" / "data")
    assert json.loads(seen["SM_HPS"]) == {"epochs": 2, "fast": True}
    assert seen["SM_HP_EPOCHS"] == "2" and seen["SM_HP_FAST"] == "true"
    assert seen["argv"] == ["--epochs", "2", "--fast", "true"]
    assert seen["cwd"] == str(opt_ml / "code")
    assert seen["channel_files"] == ["faces", "manifest.json", "protocol"]


def test_timeout_kills_the_script(channel: Path, tmp_path: Path) -> None:
    source = write_script(tmp_path / "src", "import time\nprint('sleeping')\ntime.sleep(600)\n")
    with pytest.raises(TrainingError, match="timeout"):
        train_locally(
            "pca",
            channel,
            {},
            tmp_path / "work",
            source_dir=source,
            log=lambda _: None,
            timeout_s=1,
        )


def test_a_failure_while_streaming_kills_the_script(channel: Path, tmp_path: Path) -> None:
    """If reading the output fails (here the log call raising), the script is killed, not
    waited for."""
    finished = tmp_path / "finished"
    source = write_script(
        tmp_path / "src",
        f"import time\nprint('started', flush=True)\ntime.sleep(20)\n"
        f"open({str(finished)!r}, 'w').close()\n",
    )

    def failing_log(line: str) -> None:
        if line == "started":
            raise RuntimeError("the log sink is gone")

    with pytest.raises(RuntimeError, match="log sink"):
        train_locally("pca", channel, {}, tmp_path / "work", source_dir=source, log=failing_log)
    assert not finished.exists()  # killed, not left to finish its sleep


def test_s3_dataset_is_downloaded_once(s3_storage, channel: Path, tmp_path: Path) -> None:
    prefix = "datasets/lfw/v=fake0123456789ab/"
    for path in sorted(channel.rglob("*")):
        if path.is_file():
            s3_storage.put_bytes(prefix + path.relative_to(channel).as_posix(), path.read_bytes())
    local = materialise_dataset(s3_storage, "fake0123456789ab", tmp_path / "cache")
    assert local == tmp_path / "cache" / prefix
    copied = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    original = sorted(p.relative_to(channel).as_posix() for p in channel.rglob("*") if p.is_file())
    assert copied == original
    # second call: served from the cache (storage no longer consulted)
    s3_storage.delete(prefix + "manifest.json")
    assert materialise_dataset(s3_storage, "fake0123456789ab", tmp_path / "cache") == local


def test_incomplete_dataset_is_refused(local_storage, tmp_path: Path) -> None:
    local_storage.put_bytes("datasets/lfw/v=abc/faces/part-00000.parquet", b"x")
    with pytest.raises(FileNotFoundError, match="not complete"):
        materialise_dataset(local_storage, "abc", tmp_path / "cache")


def test_unknown_model_is_refused(channel: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        train_locally("svm", channel, {}, tmp_path, python=sys.executable)


TINY_SIAMESE = {
    "epochs": 1,
    "max-train-seconds": 60,
    "eval-pairs": 60,
    "view2-folds": 0,
    "filters": "8,16",
    "embedding-dim": 16,
    "batch-size": 16,
}


@pytest.mark.slow
def test_train_siamese_runs_under_fake_opt_ml(channel: Path, tmp_path: Path) -> None:
    """One tiny epoch of the real Siamese script; the artifact loads with safe_mode."""
    lines: list[str] = []
    result = train_locally("siamese", channel, TINY_SIAMESE, tmp_path / "work", log=lines.append)
    names = {p.name for p in result.model_dir.iterdir()}
    assert {"model.json", "model.keras", "metrics.json", "savedmodel"} <= names
    assert any(line.startswith("[train_siamese] epoch 1") for line in lines)
    assert result.metrics["kind"] == "siamese"
    from models.loading import load_embedder

    embedder = load_embedder(unpack_model_archive(result.archive, tmp_path / "unpacked"))
    faces = np.random.default_rng(0).normal(size=(3, 68, 56)).astype(np.float32)
    emb = embedder.embed(faces)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
