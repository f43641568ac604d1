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
    """One `taro-vllm serve` (tiny Llama pair, compiled, fp32) shared by the server test modules: two random routers
    ("main", the default, and "alt"), two mode aliases (taro-base, taro-fixed-0.3), a_t in responses allowed."""
    from engine_utils import make_router
    from server_utils import taro_server

    tmp = tmp_path_factory.mktemp("server")
    base, reward = tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]
    router = make_router(tmp / "router", base, reward)
    alt = make_router(tmp / "alt-router", base, reward, seed=1)
    args = [str(base), "--taro-router", f"main={router}", "--taro-router", f"alt={alt}",
            "--taro-model-alias", "taro-base=base", "--taro-model-alias", "taro-fixed-0.3=fixed:0.3",
            "--dtype", "float32", "--max-model-len", "1024", "--served-model-name", "taro", "--seed", "0",
            "--taro-return-alphas"]
    with taro_server(args, tmp / "server.log") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def server(taro_server_url):
    """The session server's URL."""
    return taro_server_url[0]


@pytest.fixture
def client(server):
    """The OpenAI SDK on the session server."""
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


# Engine-test fixtures, module-scoped (each module gets its own); a module on another pair overrides `pair`.
@pytest.fixture(scope="module")
def pair(tiny_paths):
    """(base, reward): the tiny Llama pair."""
    return tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    from engine_utils import prompts

    return prompts(tokenizer)


@pytest.fixture(scope="module")
def router_ckpt(pair, tmp_path_factory):
    """A random (not freshly initialised) top-K router for the pair: a_t varies per token."""
    from engine_utils import make_router

    return make_router(tmp_path_factory.mktemp("router") / "ckpt", *pair)


_REFERENCES: dict = {}
REFERENCE_TOKENS = 24  # the longest MAX_TOKENS of the modules sharing a pair's reference


@pytest.fixture(scope="module")
def reference(pair, prompt_ids, request):
    """Stock vLLM's greedy output for each model of the pair, ``MAX_TOKENS`` of the requesting module.

    Computed once per session and pair (a fresh stock-vLLM process costs about a minute): greedy decoding of fewer
    tokens is a prefix of decoding more, so each module gets the first MAX_TOKENS of every list."""
    from engine_utils import plain_vllm_greedy

    n = request.module.MAX_TOKENS
    key = (tuple(str(p) for p in pair), repr(prompt_ids))
    if key not in _REFERENCES or _REFERENCES[key][0] < n:
        tokens = max(n, REFERENCE_TOKENS)
        _REFERENCES[key] = tokens, plain_vllm_greedy([str(p) for p in pair], prompt_ids, max_tokens=tokens)
    tokens, ref = _REFERENCES[key]
    return {model: [{k: v[:n] for k, v in run.items() if k in ("ids", "top2", "logprobs")} for run in runs]
            for model, runs in ref.items()}
