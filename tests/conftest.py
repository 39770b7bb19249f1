"""Shared fixtures: a real moto S3 server on 127.0.0.1, the Prefect test harness, fake LFW."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Environment for every test process (and the subprocesses they start).
os.environ.update(
    {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        "DO_NOT_TRACK": "1",
        "SAGEMAKER_VALIDATE_ROLE": "false",
        "SAGEMAKER_TELEMETRY_OPT_OUT": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
    }
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``sagemaker`` need the SDK extra. Without it they are skipped, unless
    FACEREID_REQUIRE_SAGEMAKER=1 (scripts/test.sh, whose venv installs the extra), where
    a missing SDK fails them: the SageMaker coverage never disappears quietly."""
    import importlib.util

    if importlib.util.find_spec("sagemaker") is not None:
        return
    if os.environ.get("FACEREID_REQUIRE_SAGEMAKER") == "1":
        return  # they run, and fail on the missing import
    skip = pytest.mark.skip(
        reason="the sagemaker SDK is not installed: pip install -e '.[sagemaker]'"
    )
    for item in items:
        if item.get_closest_marker("sagemaker"):
            item.add_marker(skip)


REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_LFW_DATA_HOME = Path(
    os.environ.get("FACEREID_REAL_LFW_DATA_HOME", REPO_ROOT.parent / "shared" / "data")
).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port that refuses connections for the whole test: bound, never listening, so no
    other process can take it and start answering."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 protocol server: moto in server mode on a free loopback port.

    ``.ci/run`` may start one and pass it in ``FACEREID_TEST_S3_ENDPOINT``.
    """
    given = os.environ.get("FACEREID_TEST_S3_ENDPOINT")
    if given:
        yield given
        return
    port = free_port()
    moto_bin = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto_bin), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"facereid-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=name
    )
    return name


@pytest.fixture
def s3_storage(moto_endpoint: str, s3_bucket: str):
    from core.storage import S3Storage

    return S3Storage(s3_bucket, "root", endpoint_url=moto_endpoint, region="us-east-1")


@pytest.fixture
def local_storage(tmp_path: Path):
    from core.storage import LocalStorage

    return LocalStorage(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def any_storage(request: pytest.FixtureRequest):
    """Run a test against both storage implementations."""
    return request.getfixturevalue(f"{request.param}_storage")


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Point the settings at a given storage; returns a function(storage, **extra)."""
    from core.settings import get_settings

    def apply(storage, **extra: str):
        uri = storage.uri
        monkeypatch.setenv("FACEREID_STORAGE_URI", uri)
        endpoint = getattr(storage, "endpoint_url", None)
        if endpoint:
            monkeypatch.setenv("FACEREID_S3_ENDPOINT_URL", endpoint)
        else:
            monkeypatch.delenv("FACEREID_S3_ENDPOINT_URL", raising=False)
        monkeypatch.setenv("FACEREID_CACHE_DIR", str(tmp_path / "cache"))
        for key, value in extra.items():
            monkeypatch.setenv(f"FACEREID_{key.upper()}", value)
        get_settings.cache_clear()
        return get_settings()

    yield apply
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server for the whole session (it takes ~11 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def fake_lfw_session(tmp_path_factory: pytest.TempPathFactory):
    """A small fake LFW tree shared (read-only) by the whole session."""
    from tests.fake_lfw import build_fake_lfw

    return build_fake_lfw(tmp_path_factory.mktemp("fake_lfw"))


@pytest.fixture
def fake_lfw(tmp_path: Path):
    """A fresh small fake LFW tree a test may modify."""
    from tests.fake_lfw import build_fake_lfw

    return build_fake_lfw(tmp_path / "lfw_data")


@pytest.fixture
def real_lfw_data_home() -> Path:
    if not (REAL_LFW_DATA_HOME / "lfw_home" / "pairs.txt").exists():
        pytest.skip(f"real LFW copy not found at {REAL_LFW_DATA_HOME}")
    return REAL_LFW_DATA_HOME
