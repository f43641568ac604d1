"""taro_vllm.model_files: what a base/reward model folder must hold to be served, checked without loading it.

The refusals as a user meets them (`taro-vllm serve`, exit 2) are in test_serving_refusals.py; these are the
checks themselves, in milliseconds.
"""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from taro_vllm.model_files import (FiniteWeights, ModelFileError, check_config, check_weights, safetensors_header,
                                   tensor_sources)

LLAMA = {"model_type": "llama", "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}


def test_a_complete_config_passes_and_aliases_count(tmp_path):
    check_config(LLAMA, tmp_path / "config.json")
    gpt2 = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 8, "n_layer": 2, "n_head": 2}
    check_config(gpt2, tmp_path / "config.json")
    multimodal = {"model_type": "some-vlm", "text_config": {k: v for k, v in LLAMA.items() if k != "model_type"}}
    check_config(multimodal, tmp_path / "config.json")


@pytest.mark.parametrize("change, msg", [
    ({"hidden_size": None}, "is missing hidden_size"),
    ({"num_hidden_layers": None, "num_attention_heads": None}, "is missing num_hidden_layers, num_attention_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ({"hidden_size": "128"}, "hidden_size must be a positive integer, got '128'"),
    ({"vocab_size": True}, "vocab_size must be a positive integer, got True"),
])
def test_a_config_without_the_sizes_is_refused(tmp_path, change, msg):
    cfg = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(ModelFileError, match="reward model config") as e:
        check_config(cfg, tmp_path / "config.json", "reward model")
    assert msg in str(e.value) and str(tmp_path / "config.json") in str(e.value)


def weights_file(path, **tensors):
    save_file(tensors or {"w": torch.zeros(4, 4), "b": torch.ones(4)}, str(path))
    return path


def test_an_intact_safetensors_file_passes_and_maps_its_tensors(tmp_path):
    f = weights_file(tmp_path / "model.safetensors")
    assert sorted(safetensors_header(f)) == ["b", "w"]
    assert check_weights(tmp_path) == {"b": f, "w": f}
    assert tensor_sources(tmp_path, "reward model", "reward.")["reward.w"] == ("reward model", f, "w")


def header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("content, msg", [
    (b"", "is truncated or empty (0 bytes)"),
    (struct.pack("<Q", 10**6) + b"{}", "header claims 1000000 bytes, the file has 10"),
    (struct.pack("<Q", 4) + b"{no}", "header does not parse"),
    (header_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 15,
     "is truncated: "),
    (header_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}) + b"\0" * 12,
     "tensor w (F32 [4]) has data offsets [0, 12]"),
    (header_bytes({"w": {"dtype": "F32", "shape": [4]}}), "header entry 'w' has no valid dtype/shape/data_offsets"),
    (b"\x80\x04\x95" + b"\0" * 20, "is a pickle (torch.save) file"),
    (b"PK\x03\x04" + b"\0" * 20, "is a pickle (torch.save) file"),
])
def test_a_broken_safetensors_file_is_refused_naming_it(tmp_path, content, msg):
    f = tmp_path / "model.safetensors"
    f.write_bytes(content)
    with pytest.raises(ModelFileError) as e:
        check_weights(tmp_path, "base model")
    assert msg in str(e.value) and f"base model file {f}" in str(e.value)


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="has no weights"):
        check_weights(tmp_path, "reward model")


def test_pytorch_bin_weights_are_accepted_unless_truncated(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    assert check_weights(tmp_path) == {}  # vLLM loads them (weights_only); nothing to map
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) - 30])
    with pytest.raises(ModelFileError, match="pytorch_model.bin is truncated or corrupt"):
        check_weights(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_a_loaded_tensor_is_refused_naming_tensor_and_file(tmp_path, dtype, bad):
    w = torch.randn(8, 8).to(dtype)
    w[3, 5] = bad
    f = weights_file(tmp_path / "model.safetensors", ok=torch.randn(4).to(dtype), w=w,
                     ids=torch.arange(4))  # an integer tensor is not checked
    check = FiniteWeights()
    for name, t in [("ok", torch.randn(4).to(dtype)), ("reward.w", w), ("reward.ids", torch.arange(4))]:
        check.add(name, t)
    assert check.flagged() == ["reward.w"]
    with pytest.raises(ModelFileError) as e:
        check.raise_if_any(tensor_sources(tmp_path, "reward model", "reward."), fix="or turn the check off")
    assert f"reward model weight w in {f} contains NaN or inf" in str(e.value)


def test_a_finite_tensor_whose_sum_overflows_is_not_refused(tmp_path):
    big = torch.full((4,), 3e38)  # finite, but the sum is inf
    weights_file(tmp_path / "model.safetensors", big=big)
    check = FiniteWeights()
    check.add("big", big)
    assert check.flagged() == ["big"]  # the cheap flag fires ...
    check.raise_if_any(tensor_sources(tmp_path, "base model"), fix="")  # ... the exact re-check from the file clears it


def test_the_weight_check_is_on_unless_the_flag_or_the_env_var_turns_it_off(monkeypatch):
    import argparse
    from types import SimpleNamespace

    from taro_vllm.serving.args import add_taro_args, taro_overrides, weight_check_enabled

    p = argparse.ArgumentParser()
    add_taro_args(p)
    assert taro_overrides(vars(p.parse_args(["--taro-router", "R"]))).get("taro_no_weight_check") is None
    hf = taro_overrides(vars(p.parse_args(["--taro-router", "R", "--taro-no-weight-check"])))
    assert hf["taro_no_weight_check"] is True
    monkeypatch.delenv("TARO_VLLM_NO_WEIGHT_CHECK", raising=False)
    assert weight_check_enabled(SimpleNamespace()) and not weight_check_enabled(SimpleNamespace(**hf))
    monkeypatch.setenv("TARO_VLLM_NO_WEIGHT_CHECK", "1")
    assert not weight_check_enabled(SimpleNamespace())


def test_prescan_refuses_nan_weights_and_skips_models_above_its_budget(tmp_path, tiny_paths):
    import shutil

    from safetensors.torch import load, save_file

    from taro_vllm.model_files import ModelFileError, scan_nonfinite

    folder = tmp_path / "m"
    shutil.copytree(tiny_paths["tiny-llama-base"], folder)
    assert scan_nonfinite(folder, "base model") is True  # clean weights pass
    state = load((folder / "model.safetensors").read_bytes())
    state["model.layers.0.mlp.up_proj.weight"][1, 2] = float("inf")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"base model weight model.layers.0.mlp.up_proj.weight in .* NaN or inf"):
        scan_nonfinite(folder, "base model")
    assert scan_nonfinite(folder, "base model", max_bytes=1) is False  # too big to pre-scan: left to the loader
