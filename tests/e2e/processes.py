"""Start and stop the real Prefect processes the e2e tests drive (server, worker, CLI)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import psutil

VENV_BIN = Path(sys.executable).parent
PREFECT = str(VENV_BIN / "prefect")


def prefect_env(api_url: str, prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a Prefect CLI/worker subprocess talking to ``api_url``.

    Its own PREFECT_HOME keeps profiles and local state out of ~/.prefect.
    """
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_COLORS": "false",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
        }
    )
    env.pop("PREFECT_PROFILE", None)
    env.update(extra)
    return env


def start(
    cmd: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path
) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop ``proc``, its process group and every descendant.

    Prefect's process worker starts each flow run in a session of its own, so killing the
    worker's group alone could leave a flow run behind.
    """
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            if p.pid == proc.pid:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                p.terminate()
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace_s)


def tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def wait_for_health(
    api_url: str, proc: subprocess.Popen | None, log_path: Path, timeout: float
) -> None:
    """Wait until the Prefect API answers /health; fail early if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Prefect API at {api_url} not healthy after {timeout}s:\n{tail(log_path)}")


def run_cli(
    args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a ``prefect`` CLI command; raise with its output when it fails."""
    result = subprocess.run(
        [PREFECT, *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"prefect {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result
