"""A throwaway moto S3 server on a free loopback port, for the benchmarks.

Deliberately independent of ``tests/conftest.py``: importing that would also apply the
test environment (e.g. ``TF_ENABLE_ONEDNN_OPTS=0``) to a benchmark process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """``(process, endpoint)`` of a moto server; the caller terminates the process."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.terminate()
    raise TimeoutError("moto_server did not start")
