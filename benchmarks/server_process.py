"""`taro-vllm serve` (or `taro-vllm demo`) on 127.0.0.1 as a context manager: launch it in its own process group,
wait for the first ``/health`` 200, stop the whole group on exit. Used by the start-up benchmark, the GPU smoke check
and the test suite's servers (tests/server_utils.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args: list[str], log: Path, *, timeout: float = 600, env: dict | None = None,
                   command: str = "serve") -> Iterator[tuple[str, subprocess.Popen, float]]:
    """Yields (url, process, seconds from launch to the first /health 200); ``env`` is laid over this environment."""
    port = free_port()
    cmd = [sys.executable, "-m", "taro_vllm.cli", command, *args, "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine core as vLLM does by default
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, proc, time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
