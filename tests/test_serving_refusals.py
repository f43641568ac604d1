"""Start-up refusals: a TARo setup that cannot be served is refused with a message naming the file and the fix.

`taro-vllm serve` checks before vLLM starts (exit code 2, no traceback); the stock `--hf-overrides` route gets the
same checks inside the model, so the engine refuses to start with the same message.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from engine_utils import ENGINE_ENV, make_router


@pytest.fixture
def pair(tiny_paths):
    return tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]


def serve(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "taro_vllm.cli", "serve", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def other_tokenizer_model(src, dest):
    """A copy of `src` whose tokenizer has one more token (and a 49153-row vocab)."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dest)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(["<calc>"])
    tok.save_pretrained(dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["vocab_size"] = 49153
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_reward_model_with_another_tokenizer(pair, tmp_path):
    reward = other_tokenizer_model(pair[1], tmp_path / "reward")
    router = make_router(tmp_path / "router", pair[0], reward)
    r = serve(pair[0], "--taro-router", router)
    assert r.returncode == 2 and "tokenizers differ" in r.stderr and str(reward) in r.stderr
    assert "Traceback" not in r.stderr


def test_router_trained_for_another_vocabulary(pair, tmp_path):
    router = make_router(tmp_path / "router", pair[0], pair[1], vocab_size=32000)
    r = serve(pair[0], "--taro-router", router)
    assert r.returncode == 2 and "router vocab_size 32000 != base vocab_size 49152" in r.stderr


def test_missing_reward_model_path(pair, tmp_path):
    router = make_router(tmp_path / "router", pair[0], tmp_path / "no-such-reward")
    r = serve(pair[0], "--taro-router", router)
    assert r.returncode == 2 and "no-such-reward" in r.stderr and "--taro-reward-model" in r.stderr
    r = serve(pair[0], "--taro-router", router, "--taro-reward-model", pair[1], "--help=TARo", timeout=300)
    assert r.returncode == 0  # the override fixes it (validation passes; --help stops before the engine)


@pytest.mark.parametrize("damage,msg", [
    ("pickle", "pickle"),
    ("truncate", "truncated or corrupt"),
    ("nan", "contains NaN or inf"),
    ("missing", "does not exist"),
])
def test_bad_router_checkpoint(pair, tmp_path, damage, msg):
    router = make_router(tmp_path / "router", *pair)
    weights = router / "model.safetensors"
    if damage == "pickle":
        weights.write_bytes(pickle.dumps({"w": [1.0]}))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "nan":
        state = load_file(weights)
        state["mlp.0.weight"][0, 0] = float("nan")
        save_file(state, weights)
    else:
        router = tmp_path / "nowhere"
    r = serve(pair[0], "--taro-router", router)
    assert r.returncode == 2 and msg in r.stderr, r.stderr[-2000:]


def test_stock_hf_overrides_route_refuses_too(pair, tmp_path):
    router = make_router(tmp_path / "router", *pair)
    state = load_file(router / "model.safetensors")
    state["mlp.0.weight"][0, 0] = float("nan")
    save_file(state, router / "model.safetensors")
    script = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM(model={str(pair[0])!r}, enforce_eager=True, max_model_len=256,\n"
        f"        hf_overrides={{'architectures': ['TaroForCausalLM'], 'taro_router': {str(router)!r}}})\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **ENGINE_ENV})
    assert r.returncode != 0
    assert "mlp.0.weight contains NaN or inf" in r.stderr and str(router) in r.stderr
