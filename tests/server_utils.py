"""Start `taro-vllm serve` on 127.0.0.1 for a test module and stop it afterwards (benchmarks.server_process, with a
small KV cache and the hub off)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from benchmarks.server_process import running_server


@contextmanager
def taro_server(args: list[str], log: Path, *, timeout: float = 600, env: dict | None = None,
                command: str = "serve"):
    test_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with running_server(args, log, timeout=timeout, env=test_env, command=command) as (url, proc, _):
        yield url, proc
