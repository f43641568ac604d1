"""One TARo setup, resolved once per process, and one row hand-off per engine (issue 17, items 2 and 3).

Two eager engines on the same base in this process, one defaulting to the router mix and one to the base alone:
each request must reach its own engine's rows (they were keyed by the base path, so the second engine's model took
over the first one's feeder), and building both reads each file of the setup once.
"""

import collections

import pytest

# engine_utils also sets the engine environment: in-process engines, so the model's reads are counted here too
from engine_utils import make_router

pytestmark = pytest.mark.engine


def ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def generate(llm, prompt_ids, extra_args=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, extra_args=extra_args)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sp, use_tqdm=False)


@pytest.fixture(scope="module")
def setup_reads(pair, router_ckpt):
    """Build both engines while counting every read of the setup's files; yields (reads, router engine, base engine)."""
    from taro_vllm import checkpoint, pairing
    from taro_vllm.serving.llm import taro_llm

    (base, reward), router = pair, router_ckpt
    reads: collections.Counter = collections.Counter()

    def counted(label, fn):
        def wrapper(path, *args, **kwargs):
            reads[(label, str(path))] += 1
            return fn(path, *args, **kwargs)
        return wrapper

    mp = pytest.MonkeyPatch()
    mp.setattr(pairing, "_RESOLVED", {})  # as in a fresh process
    mp.setattr(pairing, "read_config", counted("router config", pairing.read_config))
    mp.setattr(checkpoint, "_load_tensors", counted("router weights", checkpoint._load_tensors))
    mp.setattr(pairing, "_config_json", counted("model config", pairing._config_json))
    mp.setattr(pairing, "_fingerprint", counted("tokenizer", pairing._fingerprint))
    common = dict(dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
    try:
        by_router = taro_llm(str(base), str(router), **common)
        reads_after_first = dict(reads)
        by_base = taro_llm(str(base), str(router), default_mode="base", **common)
    finally:
        mp.undo()
    yield {"first": reads_after_first, "both": dict(reads), "base": str(base), "reward": str(reward),
           "router": str(router)}, by_router, by_base
    del by_router, by_base


def test_one_engine_start_reads_each_file_of_the_setup_once(setup_reads):
    reads, _, _ = setup_reads
    assert reads["first"] == {
        ("router config", reads["router"]): 1,
        ("router weights", reads["router"]): 1,
        ("model config", reads["base"]): 1,
        ("model config", reads["reward"]): 1,
        ("tokenizer", reads["base"]): 1,
        ("tokenizer", reads["reward"]): 1,
    }
    assert reads["both"] == reads["first"]  # a second engine on unchanged files reads nothing again


def test_the_setup_is_resolved_again_when_a_file_changes_and_a_refusal_is_never_cached(pair, tmp_path):
    from taro_vllm import pairing

    base, reward = pair
    router = make_router(tmp_path / "ckpt", base, reward, seed=1)
    first = pairing.validate_setup(base, router)
    assert pairing.validate_setup(base, router) is first
    make_router(tmp_path / "ckpt", base, reward, seed=2)  # retrained in place
    second = pairing.validate_setup(base, router)
    assert second is not first
    assert not all(bool((second.router_state[k] == first.router_state[k]).all()) for k in first.router_state)
    (router / "model.safetensors").write_bytes(b"\x80\x04 not a checkpoint")  # now broken: refused every time
    for _ in range(2):
        with pytest.raises(pairing.TaroSetupError, match="pickle"):
            pairing.validate_setup(base, router)


def test_two_engines_on_one_base_keep_their_own_default_mode(setup_reads, prompt_ids):
    _, by_router, by_base = setup_reads
    p = prompt_ids[:2]
    router_default, base_default = ids(generate(by_router, p)), ids(generate(by_base, p))
    assert ids(generate(by_router, p, {"taro_mode": "base"})) == base_default  # same weights, same batch, fp32
    assert ids(generate(by_base, p, {"taro_mode": "router"})) == router_default
    assert router_default != base_default  # the modes differ, so the equalities above say something
