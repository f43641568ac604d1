"""README's main command, `taro-vllm demo`, on a fresh machine: it builds the SmolLM2 asset, serves TARo through the
OpenAI API and records a_t (here with --enforce-eager to keep the suite short; otherwise the demo's own defaults)."""

import importlib.metadata
import shutil

import httpx
import pytest

from cli_utils import cli_in_process
from server_utils import taro_server

pytestmark = pytest.mark.engine


def test_demo_serves_taro_on_smollm2(tmp_path):
    with taro_server(["--enforce-eager"], tmp_path / "demo.log", command="demo") as (url, proc):
        body = {"model": "taro", "prompt": "Q: 12 + 7 = ?\nA:", "max_tokens": 8, "temperature": 0,
                "vllm_xargs": {"taro_trace": "demo-1"}}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()["choices"][0]
        assert out["text"] and out["finish_reason"] in ("length", "stop")
        alphas = httpx.get(f"{url}/v1/taro/alphas/demo-1", timeout=30).json()["alphas"]
        assert 1 <= len(alphas) <= 8 and all(0 < a < 1 for a in alphas)
    log = (tmp_path / "demo.log").read_text()
    assert "taro-vllm demo: base" in log and "smollm2-135m-instruct" in log


def test_demo_help_has_no_side_effects(tmp_path):
    """`taro-vllm demo --help` prints the demo's usage and vLLM's options; it builds and serves nothing."""
    r = cli_in_process("demo", "--help", env={"TARO_VLLM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage: taro-vllm demo" in r.stdout and "--max-model-len" in r.stdout
    assert not (tmp_path / "cache").exists()  # no asset built, no router saved


def test_taro_vllm_on_the_path_is_this_cli():
    """The help test above calls the CLI entry in this process; README's `taro-vllm ...` is the installed script."""
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["taro-vllm"] == "taro_vllm.cli:main" and shutil.which("taro-vllm")
