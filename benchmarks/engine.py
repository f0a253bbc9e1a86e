"""An engine in a child process on a free loopback port, for the load tools and their tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_engine(env: dict, log_path: Path, *, cwd: Path = ROOT, timeout_s: float = 30.0
                 ) -> tuple[subprocess.Popen, str]:
    """Start ``citizencard serve`` (settings from ``env``: ``CITIZENCARD_DB``, ``_KEYS``…) on a
    free port of 127.0.0.1, its stderr in ``log_path``, and wait until ``GET /healthz``
    answers. Returns (the process, its base URL); the caller stops it by its pid. Raises
    ``RuntimeError`` naming the log when it exits or does not answer within ``timeout_s``
    (it is then stopped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], env=env, cwd=cwd,
                                  stdout=subprocess.DEVNULL, stderr=log)
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(host + "/healthz", timeout=1)
            return server, host
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                stop_engine(server)
                raise RuntimeError(f"the engine did not start; see {log_path}") from None
            time.sleep(0.2)


def stop_engine(server: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop an engine :func:`start_engine` started: SIGTERM, then SIGKILL after ``timeout_s``."""
    if server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
