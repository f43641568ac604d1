"""Router training: it learns *where* to trust which model, resumes exactly, and writes a servable checkpoint.

The behavioural test uses a synthetic pair of "models" whose right answer is known: sequences follow a fixed chain
``x[t+1] = NEXT[x[t]]``; the base predicts the next token correctly when it is a low id (type A) and confidently
proposes a wrong token of the same type otherwise, the reward model the other way round. The ideal router puts a
near 0 before type-A tokens and near 1 before type-B tokens, which no fixed a can do.
"""

from __future__ import annotations

import json

import pytest
import torch

from router_training.__main__ import main
from router_training.data import Solution, save_records
from router_training.encoding import collate
from router_training.errors import TrainingSetupError
from router_training.loop import LoopConfig
from router_training.router_trainer import RouterInputs, RouterTrainConfig, router_spec, scored_rows, train_router
from taro_vllm.checkpoint import load_router, tokenizer_fingerprint

V = 32
HALF = V // 2
NEXT = torch.randperm(V, generator=torch.Generator().manual_seed(0))
NOISE = torch.randn(V, V, generator=torch.Generator().manual_seed(1))


def synthetic_source(correct_on_low_ids: bool):
    """Logits [B, T, V] from the current token: a +6 peak on the true next token when this model is right for its
    type, else on a wrong token of the same type; plus fixed noise."""

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        nxt = NEXT[input_ids]
        low = nxt < HALF
        right = low if correct_on_low_ids else ~low
        wrong = torch.where(low, (nxt + 1) % HALF, HALF + (nxt - HALF + 1) % HALF)
        peak = torch.where(right, nxt, wrong)
        z = NOISE[input_ids].clone()
        z.scatter_add_(-1, peak[..., None], torch.full(peak.shape + (1,), 6.0))
        return z

    return logits


def chain_examples(n: int, length: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = [int(torch.randint(V, (1,), generator=g))]
        for _ in range(length):
            x.append(int(NEXT[x[-1]]))
        out.append((x[:1], x[1:]))  # first token = "prompt" (not scored), the rest = the "solution"
    return out


def synthetic_inputs() -> RouterInputs:
    return RouterInputs(base=synthetic_source(True), reward=synthetic_source(False), vocab_size=V,
                        train=chain_examples(48, 12, seed=0), heldout=chain_examples(12, 12, seed=1))


@pytest.mark.parametrize("kind", ["topk", "full"])
def test_router_learns_where_to_trust_each_model(tmp_path, kind):
    inp = synthetic_inputs()
    cfg = RouterTrainConfig(out=str(tmp_path / kind), router=router_spec(kind=kind, k=4, embed_dim=8, hidden_dim=32),
                            loop=LoopConfig(lr=1e-2, batch_size=8, max_steps=120, eval_every=60, checkpoint_every=1000,
                                            progress=False))
    res = train_router(cfg, inp)

    batch = collate(list(inp.heldout), pad_id=0)
    zb, zr, y, _ = scored_rows(inp.base, inp.reward, batch)
    with torch.no_grad():
        a = res.router(zb, zr)
    base_right = y < HALF
    assert a[base_right].mean() < 0.15, "a should be low where the base is right"
    assert a[~base_right].mean() > 0.85, "a should be high where the reward model is right"

    meta = json.loads((tmp_path / kind / "config.json").read_text())["training"]
    baseline = meta["fixed_a_baseline"]
    # No single a is good here; the router beats the best one by a wide margin.
    assert res.eval["nll"] < 0.5 * baseline["best_fixed_nll"]
    assert (tmp_path / kind / "train" / "curves.png").stat().st_size > 0


def test_preference_term_prefers_the_chain_over_a_wrong_continuation(tmp_path):
    # chosen = the true next tokens, rejected = the same length of "off by one" tokens after the same prefix
    pairs = []
    for ctx, sol in chain_examples(16, 6, seed=2):
        prefix, step = ctx + sol[:3], sol[3:]
        pairs.append((prefix, step, prefix, [(t + 1) % V for t in step]))
    inp = synthetic_inputs()
    inp.pairs = pairs
    cfg = RouterTrainConfig(out=str(tmp_path / "pref"), pref_weight=1.0, pref_beta=0.5, pref_batch_size=4,
                            router=router_spec(k=4, embed_dim=8, hidden_dim=16),
                            loop=LoopConfig(lr=1e-2, batch_size=4, max_steps=30, eval_every=30, checkpoint_every=1000,
                                            progress=False))
    train_router(cfg, inp)
    rows = [json.loads(line) for line in (tmp_path / "pref" / "train" / "metrics.jsonl").open()]
    pref = [r["pref_loss"] for r in rows if r["split"] == "train"]
    assert len(pref) == 30 and sum(pref[-5:]) / 5 < 0.5 * sum(pref[:5]) / 5


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    def cfg(out, **loop):
        return RouterTrainConfig(out=str(tmp_path / out), router=router_spec(k=4, embed_dim=8, hidden_dim=16),
                                 loop=LoopConfig(lr=5e-3, batch_size=4, max_steps=12, eval_every=6, checkpoint_every=4,
                                                 progress=False, **loop))

    whole = train_router(cfg("whole"), synthetic_inputs())

    killed = train_router(cfg("killed", stop_after=6), synthetic_inputs())
    assert not killed.finished and killed.steps == 6  # state on disk is from step 4; steps 5-6 are lost
    resumed = train_router(cfg("killed", resume=True), synthetic_inputs())

    assert resumed.finished and resumed.steps == 12
    for (name, w), (_, r) in zip(whole.router.state_dict().items(), resumed.router.state_dict().items()):
        assert torch.equal(w, r), name
    steps = [r["step"] for r in map(json.loads, (tmp_path / "killed" / "train" / "metrics.jsonl").open())
             if r["split"] == "train"]
    assert steps == list(range(1, 13)), "the killed tail's metrics are dropped, not duplicated"


def test_resume_with_other_settings_is_refused(tmp_path):
    def cfg(**loop):
        return RouterTrainConfig(out=str(tmp_path / "r"), router=router_spec(k=4, embed_dim=8, hidden_dim=16),
                                 loop=LoopConfig(batch_size=4, max_steps=6, checkpoint_every=2, progress=False, **loop))

    train_router(cfg(lr=1e-3, stop_after=3), synthetic_inputs())
    with pytest.raises(TrainingSetupError, match="lr"):
        train_router(cfg(lr=5e-3, resume=True), synthetic_inputs())


@pytest.fixture(scope="module")
def solutions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "solutions.jsonl"
    save_records(path, [Solution(f"What is {i} + {i + 1}?", f"{i} + {i + 1} = {2 * i + 1}\nThe answer is {2 * i + 1}.",
                                 id=f"q{i}", group=f"q{i}") for i in range(12)])
    return path


def test_cli_trains_a_servable_router_on_tiny_models(tmp_path, tiny_paths, tokenizer, solutions_file, capsys):
    out = tmp_path / "router"
    rc = main(["router", "--base", str(tiny_paths["tiny-llama-base"]), "--reward", str(tiny_paths["tiny-qwen2-reward"]),
               "--data", str(solutions_file), "--pairs", str(solutions_file.parent / "none.jsonl"),
               "--out", str(out), "--max-steps", "3", "--no-progress"])
    assert rc == 2 and "none.jsonl does not exist" in capsys.readouterr().err

    rc = main(["router", "--base", str(tiny_paths["tiny-llama-base"]), "--reward", str(tiny_paths["tiny-qwen2-reward"]),
               "--data", str(solutions_file), "--out", str(out), "--max-steps", "3", "--max-len", "64",
               "--eval-every", "3", "--no-progress"])
    assert rc == 0
    router, cfg = load_router(out, expected_vocab_size=len(tokenizer),
                              expected_tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    assert cfg.reward_model == str(tiny_paths["tiny-qwen2-reward"].resolve())
    assert cfg.base_model == str(tiny_paths["tiny-llama-base"].resolve())
    assert cfg.training["steps"] == 3 and cfg.training["fixed_a_baseline"]["best_fixed_nll"] > 0
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").open()]
    assert {r["split"] for r in rows} == {"train", "eval"}
    assert not (out / "train" / "state").exists(), "resumable state is dropped after a finished run"


def test_cli_refuses_mismatched_tokenizers(tmp_path, tiny_paths, solutions_file, capsys):
    from transformers import AutoTokenizer

    # The reward model with one extra token: its ids no longer line up with the base's.
    other = tmp_path / "other-reward"
    other.mkdir()
    src = tiny_paths["tiny-llama-reward"]
    for f in ("config.json", "model.safetensors"):
        (other / f).symlink_to(src / f)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens(["<extra_step_token>"])
    tok.save_pretrained(str(other))

    rc = main(["router", "--base", str(tiny_paths["tiny-llama-base"]), "--reward", str(other),
               "--data", str(solutions_file), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "different tokenizers" in err and "Traceback" not in err


def test_router_training_never_imports_vllm():
    import subprocess
    import sys

    code = ("import sys, router_training.__main__, router_training.router_trainer, router_training.reward_trainer, "
            "router_training.gsm, router_training.champ; print(sorted(m for m in sys.modules if m.startswith('vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
