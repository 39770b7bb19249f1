"""Fixtures for the e2e tests: a real Prefect server and the deployments of prefect.yaml.

``.ci/run`` (scripts/with_test_services.sh) may start the server once and pass it in
``FACEREID_TEST_PREFECT_API_URL``; otherwise these fixtures start their own
``prefect server start`` on a free loopback port and stop it at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.e2e.processes import PREFECT, prefect_env, run_cli, start, stop_tree, wait_for_health

WORK_POOL = "facereid-process"  # the pool every deployment in prefect.yaml uses


@dataclass
class PrefectServer:
    api_url: str
    home: Path  # PREFECT_HOME for CLI and worker subprocesses
    logs: Path

    def env(self, **extra: str) -> dict[str, str]:
        return prefect_env(self.api_url, self.home, **extra)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    root = tmp_path_factory.mktemp("prefect_e2e")
    logs = root / "logs"
    given = os.environ.get("FACEREID_TEST_PREFECT_API_URL")
    if given:
        wait_for_health(given, None, logs / "server.log", timeout=60)
        yield PrefectServer(given.rstrip("/"), root / "client-home", logs)
        return
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = prefect_env(api_url, root / "server-home", PREFECT_UI_ENABLED="false")
    server_env.pop("PREFECT_API_URL")  # the server itself needs no client URL
    proc = start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        server_env,
        logs / "server.log",
        cwd=root,
    )
    try:
        wait_for_health(api_url, proc, logs / "server.log", timeout=180)
        yield PrefectServer(api_url, root / "client-home", logs)
    finally:
        stop_tree(proc)


@pytest.fixture(scope="session")
def deployed(prefect_server: PrefectServer) -> PrefectServer:
    """The work pool plus ``prefect --no-prompt deploy --all`` run from the repo root."""
    env = prefect_server.env()
    inspect = run_cli_ok(["work-pool", "inspect", WORK_POOL], env)
    if not inspect:
        run_cli(["work-pool", "create", WORK_POOL, "--type", "process"], env, cwd=REPO_ROOT)
    run_cli(["--no-prompt", "deploy", "--all"], env, cwd=REPO_ROOT, timeout=600)
    return prefect_server


def run_cli_ok(args: list[str], env: dict[str, str]) -> bool:
    try:
        run_cli(args, env, cwd=REPO_ROOT, timeout=120)
    except AssertionError:
        return False
    return True
