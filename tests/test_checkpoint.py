import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from taro_vllm.demo import demo_router
from taro_vllm.checkpoint import CheckpointError, load_router, read_config, save_router, tokenizer_fingerprint
from taro_vllm.router import RouterConfig, build_router

V = 512


def trained_router(kind="topk", dtype=torch.float32):
    torch.manual_seed(0)
    r = build_router(RouterConfig(kind=kind, vocab_size=V, k=4)).to(dtype)
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return r


@pytest.mark.parametrize("kind", ["topk", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trips_bit_for_bit(tmp_path, kind, dtype):
    r = trained_router(kind, dtype)
    save_router(tmp_path / "ckpt", r, tokenizer_fingerprint="sha256:abc", base_model="base", reward_model="rm",
                training={"steps": 3})
    loaded, cfg = load_router(tmp_path / "ckpt", expected_vocab_size=V, expected_tokenizer_fingerprint="sha256:abc")
    assert cfg.router == r.cfg and cfg.reward_model == "rm" and cfg.training == {"steps": 3}
    for (n1, t1), (n2, t2) in zip(r.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_tokenizer_fingerprint_tells_tokenizers_apart(tokenizer, tiny_paths):
    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(tiny_paths["tiny-qwen2-reward"])  # same tokenizer, other model
    tokenizer2 = type(tokenizer).from_pretrained(str(tiny_paths["tiny-llama-base"]))
    tokenizer2.add_tokens(["<extra_token>"])
    assert tokenizer_fingerprint(tokenizer2) != fp


@pytest.fixture
def ckpt(tmp_path):
    return save_router(tmp_path / "ckpt", trained_router(), tokenizer_fingerprint="sha256:aaaa")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_router(tmp_path / "nope")


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_router(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_router(ckpt)


def test_pickle_is_refused_and_never_unpickled(ckpt):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (ckpt / "model.safetensors").write_bytes(pickle.dumps(Boom(), protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_router(ckpt)


def test_torch_save_zip_is_refused(ckpt):
    torch.save(trained_router().state_dict(), ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        load_router(ckpt)


def test_pickle_next_to_missing_safetensors_is_named(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({}, ckpt / "router.pt")
    with pytest.raises(CheckpointError, match=r"router\.pt"):
        load_router(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_router(ckpt)


def test_wrong_shapes_name_the_tensor(ckpt):
    state = trained_router().state_dict()
    state["embed.weight"] = torch.zeros(V + 1, 16)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"embed\.weight has shape \(513, 16\)"):
        load_router(ckpt)


def test_k_mismatch_between_config_and_weights(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["router"]["k"] = 8
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="shape"):
        load_router(ckpt)


def test_missing_tensor(ckpt):
    state = trained_router().state_dict()
    del state["mlp.2.bias"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['mlp.2.bias'\]"):
        load_router(ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(ckpt, bad):
    state = trained_router().state_dict()
    state["mlp.0.weight"][0, 0] = bad
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mlp\.0\.weight contains NaN or inf"):
        load_router(ckpt)


def test_vocab_mismatch(ckpt):
    with pytest.raises(CheckpointError, match="vocab_size 512 != served vocab_size 49152"):
        load_router(ckpt, expected_vocab_size=49152)


def test_tokenizer_mismatch(ckpt):
    with pytest.raises(CheckpointError, match="tokenizer fingerprint"):
        load_router(ckpt, expected_tokenizer_fingerprint="sha256:bbbb")


def test_config_that_is_not_ours(ckpt):
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="not a TARo router config"):
        read_config(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(ckpt)


def test_format_1_checkpoint_must_be_retrained(ckpt):
    # Format 2 changed what the router's first layer reads (scaled, row-centred log-probs): old weights are refused.
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["format_version"] == 2 and raw["router"]["input_scale"] == 0.1
    raw["format_version"] = 1
    del raw["router"]["input_scale"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json is a format-1 router checkpoint: the router's input "
                                              r"scaling changed in format 2.*must be retrained"):
        load_router(ckpt)


def test_demo_router_rebuilds_an_old_untrained_router_and_skips_an_old_trained_one(tmp_path, monkeypatch, tiny_paths):
    base = tiny_paths["tiny-llama-base"]
    monkeypatch.setenv("TARO_VLLM_CACHE", str(tmp_path))
    for old in (tmp_path / "routers" / "smollm2-untrained", tmp_path / "runs" / "smollm2" / "router"):
        save_router(old, trained_router())
        raw = json.loads((old / "config.json").read_text())
        (old / "config.json").write_text(json.dumps({**raw, "format_version": 1}))
    with pytest.warns(UserWarning, match="format-1 router checkpoint"):
        path = demo_router(base)
    assert path == tmp_path / "routers" / "smollm2-untrained"
    router, cfg = load_router(path, expected_vocab_size=49152,
                              expected_tokenizer_fingerprint=tokenizer_fingerprint(base))
    assert cfg.format_version == 2
    torch.testing.assert_close(router(torch.randn(3, 49152), torch.randn(3, 49152)), torch.full((3,), 0.1))


def test_an_untrained_router_serves_any_base_with_itself_as_reward(tmp_path, monkeypatch, tiny_paths):
    """What on-policy sampling serves (taro_mode=base): built once per base, for a base of any tokenizer size."""
    from taro_vllm.demo import untrained_router
    from taro_vllm.pairing import validate_setup

    monkeypatch.setenv("TARO_VLLM_CACHE", str(tmp_path))
    llama, qwen = tiny_paths["tiny-llama-base"], tiny_paths["tiny-qwen2-base"]
    a, b = untrained_router(llama), untrained_router(qwen)
    assert a != b and untrained_router(qwen) == b  # one per base, reused
    for base, path in ((llama, a), (qwen, b)):
        _, cfg = load_router(path)
        assert cfg.base_model == cfg.reward_model == str(base)
        validate_setup(base, path)  # pairs with its own base: no TaroSetupError
