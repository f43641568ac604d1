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
