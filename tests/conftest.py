import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_paths():
    """The tiny random models on SmolLM2's tokenizer (built once into the cache)."""
    from taro_vllm import assets

    return assets.build_tiny_all()


@pytest.fixture(scope="session")
def tokenizer(tiny_paths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_paths["tiny-llama-base"]))


@pytest.fixture(scope="session")
def taro_server_url(tiny_paths, tmp_path_factory):
    """One `taro-vllm serve` (tiny Llama pair, random router, compiled, fp32) shared by the server test modules."""
    from engine_utils import make_router
    from server_utils import taro_server

    tmp = tmp_path_factory.mktemp("server")
    base, reward = tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]
    router = make_router(tmp / "router", base, reward)
    args = [str(base), "--taro-router", str(router), "--dtype", "float32", "--max-model-len", "1024",
            "--served-model-name", "taro", "--seed", "0"]
    with taro_server(args, tmp / "server.log") as (url, proc):
        yield url, proc
