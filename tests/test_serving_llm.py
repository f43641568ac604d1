"""TARo through vLLM's offline LLM API, compiled (torch.compile ON), fp32, on the tiny Llama pair.

One TARo engine for the module; stock-vLLM references come from a separate process.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import engine_utils  # noqa: F401  (sets the engine environment)

pytestmark = pytest.mark.engine
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def second_router(pair, tmp_path_factory):
    from engine_utils import make_router

    return make_router(tmp_path_factory.mktemp("router2") / "ckpt", *pair, seed=1)


@pytest.fixture(scope="module")
def llm(pair, router_ckpt, second_router):
    from taro_vllm.serving.llm import taro_llm

    # Two routers in the engine; "main" (the fixture router) is the default every other test here uses.
    engine = taro_llm(str(pair[0]), {"main": str(router_ckpt), "alt": str(second_router)}, dtype="float32",
                      max_model_len=1024, seed=0, enforce_eager=False)
    yield engine
    del engine


def generate(llm, prompt_ids, extra_args=None, *, max_tokens=MAX_TOKENS, logprobs=None, n=1, temperature=0.0,
             seed=None):
    """Greedy by default; ``extra_args`` is one dict for every prompt or a list of one per prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    per_prompt = extra_args if isinstance(extra_args, list) else [extra_args] * len(prompt_ids)
    sp = [SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True, extra_args=xa,
                         logprobs=logprobs, n=n, seed=seed) for xa in per_prompt]
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sp, use_tqdm=False)


def ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_a0_is_the_base_alone_and_a1_the_reward_alone(llm, prompt_ids, reference, pair):
    base_ref = [r["ids"] for r in reference[str(pair[0])]]
    reward_ref = [r["ids"] for r in reference[str(pair[1])]]
    assert ids(generate(llm, prompt_ids, {"taro_mode": "base"})) == base_ref
    assert ids(generate(llm, prompt_ids, {"taro_mode": "reward"})) == reward_ref
    assert ids(generate(llm, prompt_ids, {"taro_mode": "fixed", "taro_alpha": 0.0})) == base_ref
    # Second pass: the prompts' KV blocks are now prefix-cache hits.
    assert ids(generate(llm, prompt_ids, {"taro_mode": "fixed", "taro_alpha": 1.0})) == reward_ref


def test_fixed_half_equals_the_hugging_face_reference(llm, prompt_ids, pair):
    from taro_vllm.hf_generate import generate_mixed

    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()
    reward = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    hf = generate_mixed(base, reward, prompt_ids, MAX_TOKENS, alpha=0.5)
    out = generate(llm, prompt_ids, {"taro_mode": "fixed", "taro_alpha": 0.5}, logprobs=0)
    for h, o in zip(hf, out):
        assert list(o.outputs[0].token_ids) == h.token_ids
        got = [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        # Returned logprobs are those of the mixed distribution actually sampled from.
        assert max(abs(a - b) for a, b in zip(got, h.logprobs)) < 2e-3


def test_the_router_mixes_per_token(llm, prompt_ids, reference, pair):
    from taro_vllm.serving.alphas import RECORDER

    # default mode: the router; each request's a_t recorded per token
    taro = ids(generate(llm, prompt_ids, [{"taro_trace": f"per-token-{i}"} for i in range(len(prompt_ids))]))
    for i, out in enumerate(taro):
        assert out != reference[str(pair[0])][i]["ids"]
        assert out != reference[str(pair[1])][i]["ids"]
        # a weight per token, not one for the sequence (a fixed a = 0.5 mixes too, and fails this)
        a = RECORDER.pop(f"per-token-{i}")
        assert len(a) == MAX_TOKENS and max(a) - min(a) > 0.05, a


def test_router_output_matches_the_reference_router_mix(llm, prompt_ids, pair, router_ckpt):
    from taro_vllm.checkpoint import load_router
    from taro_vllm.hf_generate import generate_mixed

    router, _ = load_router(router_ckpt)
    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()
    reward = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    hf = generate_mixed(base, reward, prompt_ids[:2], 12, router=router)
    out = generate(llm, prompt_ids[:2], max_tokens=12)
    assert ids(out) == [h.token_ids for h in hf]


def test_mixed_modes_in_one_batch_equal_one_at_a_time(llm, prompt_ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    modes = [None, {"taro_mode": "base"}, {"taro_mode": "reward"}, {"taro_alpha": 0.3}]
    alone = [ids(generate(llm, [p], m))[0] for p, m in zip(prompt_ids, modes)]
    sps = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, extra_args=m) for m in modes]
    together = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sps, use_tqdm=False)
    assert ids(together) == alone


def test_alphas_are_recorded_for_traced_requests_only(llm, prompt_ids):
    from taro_vllm.serving.alphas import RECORDER

    generate(llm, prompt_ids[:1], {"taro_trace": "t-router"}, max_tokens=10)
    generate(llm, prompt_ids[:1], {"taro_trace": "t-fixed", "taro_alpha": 0.25}, max_tokens=10)
    generate(llm, prompt_ids[:1], max_tokens=10)
    a_router = RECORDER.pop("t-router")
    assert len(a_router) == 10 and all(0 < a < 1 for a in a_router) and len(set(a_router)) > 1
    assert RECORDER.pop("t-fixed") == [0.25] * 10
    assert RECORDER.pop("t-router") is None  # returned once
    assert RECORDER.stats()["count"] >= 30


def test_bad_per_request_options_are_rejected_before_running(llm, prompt_ids):
    from vllm.exceptions import VLLMValidationError

    for bad, msg in [({"taro_mode": "sideways"}, "taro_mode must be one of"),
                     ({"taro_alpha": 1.5}, r"taro_alpha must be in \[0, 1\]"),
                     ({"taro_alpha": "half"}, "taro_alpha must be a number"),
                     ({"taro_mode": "fixed"}, "needs taro_alpha"),
                     ({"taro_alfa": 0.2}, "unknown TARo option")]:
        with pytest.raises(VLLMValidationError, match=msg):
            generate(llm, prompt_ids[:1], bad, max_tokens=2)
    assert len(ids(generate(llm, prompt_ids[:1], max_tokens=2))[0]) == 2  # still serving


def test_seeded_sampling_and_n(llm, prompt_ids):
    a = generate(llm, prompt_ids[:1], {"taro_alpha": 0.5}, temperature=1.0, seed=7, n=3, max_tokens=8)
    b = generate(llm, prompt_ids[:1], {"taro_alpha": 0.5}, temperature=1.0, seed=7, n=3, max_tokens=8)
    samples = [list(c.token_ids) for c in a[0].outputs]
    assert samples == [list(c.token_ids) for c in b[0].outputs] and len(samples) == 3
    assert len({tuple(s) for s in samples}) > 1


def test_trace_with_n_gives_one_list_per_choice(llm, prompt_ids):
    """D12: vLLM runs each of the n samples as its own engine request (child seeds seed + index); the trace keeps
    one list per choice, each the a_t of that choice's tokens, equal to a lone n = 1 request with the child's seed."""
    from taro_vllm.serving.alphas import RECORDER

    out = generate(llm, prompt_ids[:1], {"taro_trace": "t-n2"}, temperature=1.0, seed=11, n=2, max_tokens=8)[0]
    got = RECORDER.pop_trace("t-n2")
    assert set(got) == {"choices"} and [c["index"] for c in got["choices"]] == [0, 1]
    choices = sorted(out.outputs, key=lambda c: c.index)
    assert list(choices[0].token_ids) != list(choices[1].token_ids)
    for c, traced in zip(choices, got["choices"]):
        assert len(traced["alphas"]) == len(c.token_ids) == 8
        alone = generate(llm, prompt_ids[:1], {"taro_trace": f"t-alone-{c.index}"}, temperature=1.0,
                         seed=11 + c.index, max_tokens=8)[0]
        assert list(alone.outputs[0].token_ids) == list(c.token_ids)
        alone_alphas = RECORDER.pop(f"t-alone-{c.index}")  # n = 1: the flat list, as before
        assert max(abs(a - b) for a, b in zip(alone_alphas, traced["alphas"])) < 1e-4


def test_prompt_logprobs_are_the_server_default_mix_whatever_the_mode(llm, prompt_ids, pair, router_ckpt):
    """D11, pinned: vLLM computes prompt logprobs in a second compute_logits call that carries no request identity
    (V1: one call per request; V2: the prompt tokens of several requests in one call), so they are those of the
    server's default mode (here the router mix), whatever the request's taro_mode. The sampled tokens' logprobs
    follow the request's mode (test_fixed_half_equals_the_hugging_face_reference)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from taro_vllm import mix
    from taro_vllm.checkpoint import load_router

    prompt = prompt_ids[1][:40]
    router, _ = load_router(router_ckpt)
    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()
    reward = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    with torch.no_grad():
        ids_t = torch.tensor([prompt])
        z_base, z_reward = base(ids_t).logits[0, :-1].float(), reward(ids_t).logits[0, :-1].float()
        routed = mix.route_and_mix(z_base, z_reward, router=router).logits
    rows, targets = torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])

    def at_targets(z):
        return torch.log_softmax(z.float(), dim=-1)[rows, targets].tolist()

    expected, reward_alone = at_targets(routed), at_targets(z_reward)
    assert max(abs(a - b) for a, b in zip(expected, reward_alone)) > 0.1  # the test can tell them apart
    for xargs in (None, {"taro_mode": "reward"}, {"taro_mode": "base"}, {"taro_alpha": 0.5}):
        sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=0, extra_args=xargs)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)[0]
        got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        assert len(got) == len(prompt) - 1
        assert max(abs(a - b) for a, b in zip(got, expected)) < 2e-3, xargs


def traced(llm, prompt_ids, xargs, key):
    from taro_vllm.serving.alphas import RECORDER

    (out,) = ids(generate(llm, prompt_ids, {**xargs, "taro_trace": key}, max_tokens=10))
    return out, RECORDER.pop(key)


def test_rows_of_one_batch_use_the_router_their_request_names(llm, prompt_ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from taro_vllm.serving.alphas import RECORDER

    names = ["main", "alt", "alt", "main"]
    alone = [traced(llm, [p], {"taro_router": n}, f"alone-{i}") for i, (p, n) in enumerate(zip(prompt_ids, names))]
    assert traced(llm, prompt_ids[:1], {}, "default") == alone[0]  # no name: the default router, "main"
    sps = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                          extra_args={"taro_router": n, "taro_trace": f"together-{i}"}) for i, n in enumerate(names)]
    together = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sps, use_tqdm=False)
    for i, out in enumerate(together):
        assert list(out.outputs[0].token_ids) == alone[i][0]
        assert RECORDER.pop(f"together-{i}") == pytest.approx(alone[i][1], abs=1e-5)
    main_on_1 = traced(llm, prompt_ids[1:2], {"taro_router": "main"}, "main-1")[1]
    assert max(abs(a - b) for a, b in zip(main_on_1, alone[1][1])) > 1e-3  # "alt" is really another router


def test_routers_load_and_unload_at_run_time_and_bad_ones_are_refused(llm, prompt_ids, pair, second_router,
                                                                      tmp_path):
    from engine_utils import make_router

    (problem,) = llm.collective_rpc("taro_load_router", args=("bad", str(tmp_path / "missing")))
    assert "does not exist" in problem or "no config.json" in problem
    wrong = make_router(tmp_path / "wrong", pair[0], pair[0], seed=3)  # trained with another reward model
    (problem,) = llm.collective_rpc("taro_load_router", args=("wrong", str(wrong)))
    assert "share its reward model" in problem
    assert llm.collective_rpc("taro_load_router", args=("late", str(second_router))) == [None]
    late = traced(llm, prompt_ids[:1], {"taro_router": "late"}, "late")
    assert late == traced(llm, prompt_ids[:1], {"taro_router": "alt"}, "alt-again")  # same checkpoint as "alt"
    assert llm.collective_rpc("taro_unload_router", args=("late",)) == [None]
    assert "default router" in llm.collective_rpc("taro_unload_router", args=("main",))[0]
    assert len(ids(generate(llm, prompt_ids[:1], max_tokens=3))[0]) == 3  # still serving
