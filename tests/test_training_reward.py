"""Reward-model training (GenARM loss) on a tiny model: it separates a learnable pair set, LoRA is merged into a
plain model, a killed run resumes to the same weights, and bad inputs are one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from router_training.__main__ import main
from router_training.data import StepPair, save_records
from router_training.encoding import ExampleConfig
from router_training.reward_trainer import RewardTrainConfig, reward_loop, train_reward, trained_weights


def cue_pairs(n: int) -> list[StepPair]:
    """The right verdict depends on a cue in the prefix, so a random model sits near chance and must learn."""
    pairs = []
    for i in range(n):
        ok = i % 2 == 0
        good, bad = ("Verdict: correct.", "Verdict: wrong.") if ok else ("Verdict: wrong.", "Verdict: correct.")
        prefix = f"Check {i}: {'pass' if ok else 'fail'}.\n"
        pairs.append(StepPair("synthetic", f"Is result {i} right?", prefix, good, bad, prefix + good, prefix + bad,
                              "yes" if ok else "no", id=f"p{i}", group=f"p{i}"))
    return pairs


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return save_records(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", cue_pairs(80))


def small(tiny_paths, pairs_file, out, loop=None, heldout_fraction=0.25, **kw) -> RewardTrainConfig:
    """A tiny run: ``kw`` overrides the reward model's settings, ``loop`` the shared loop's (steps, resume...)."""
    base = dict(model=str(tiny_paths["tiny-llama-reward"]), data=[str(pairs_file)], out=str(out),
                examples=ExampleConfig(max_len=32, heldout_fraction=heldout_fraction, chat_template=False))
    return RewardTrainConfig(**{**base, **kw},
                             loop=reward_loop(**{"lr": 1e-3, "warmup": 2, "batch_size": 8, "progress": False,
                                                 **(loop or {})}))


def test_reward_model_separates_heldout_pairs(tmp_path, tiny_paths, pairs_file):
    res = train_reward(small(tiny_paths, pairs_file, tmp_path / "rm", loop=dict(max_steps=24, eval_every=24)))
    rows = [json.loads(line) for line in (tmp_path / "rm" / "train" / "metrics.jsonl").open()]
    before = next(r for r in rows if r["split"] == "eval" and r["step"] == 0)
    assert before["pairwise_accuracy"] < 0.8, "the task must not be solved at init"
    assert res.eval["pairwise_accuracy"] > 0.9 and res.eval["margin"] > 0
    assert res.eval["pairs"] == 20  # 25% of the 80 problems, none of them trained on
    # The output is an ordinary model folder (what vLLM loads), with the tokenizer.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "rm"))
    assert (tmp_path / "rm" / "tokenizer.json").is_file() and (tmp_path / "rm" / "train" / "curves.png").is_file()


def test_lora_is_merged_into_a_plain_model(tmp_path, tiny_paths, pairs_file):
    train_reward(small(tiny_paths, pairs_file, tmp_path / "lora", lora=True, lora_r=4, heldout_fraction=0.05,
                       loop=dict(max_steps=2, eval_every=2)))
    names = trained_weights(tmp_path / "lora").keys()
    assert not any("lora" in n for n in names), "adapters must be merged before saving"
    start = trained_weights(tiny_paths["tiny-llama-reward"])
    assert set(names) == set(start)
    assert any(not torch.equal(trained_weights(tmp_path / "lora")[n], start[n]) for n in names)


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_paths, pairs_file):
    common = dict(max_steps=4, checkpoint_every=2, eval_every=4)
    whole = train_reward(small(tiny_paths, pairs_file, tmp_path / "whole", heldout_fraction=0.05, loop=common))
    killed = train_reward(small(tiny_paths, pairs_file, tmp_path / "killed", heldout_fraction=0.05,
                                loop={**common, "stop_after": 3}))
    assert not killed.finished  # the state on disk is from step 2; step 3 is lost with the "kill"
    resumed = train_reward(small(tiny_paths, pairs_file, tmp_path / "killed", heldout_fraction=0.05,
                                 loop={**common, "resume": True}))
    assert resumed.finished and resumed.steps == whole.steps == 4
    a, b = trained_weights(whole.model_dir), trained_weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ("{not json\n", "line 1: not valid JSON"),
    ('{"prompt": "p", "chosen": "c"}\n', "missing column(s) ['initial_reason_steps', 'rejected']"),
])
def test_bad_data_file_is_a_clear_error(tmp_path, tiny_paths, capsys, content, message):
    path = tmp_path / "pairs.jsonl"
    if content is not None:
        path.write_text(content)
    rc = main(["reward", "--model", str(tiny_paths["tiny-llama-reward"]), "--data", str(path),
               "--out", str(tmp_path / "rm"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_reward_end_to_end(tmp_path, tiny_paths, pairs_file, capsys):
    rc = main(["reward", "--model", str(tiny_paths["tiny-llama-reward"]), "--data", str(pairs_file),
               "--out", str(tmp_path / "rm"), "--max-steps", "2", "--max-len", "32", "--no-chat-template",
               "--lora", "--lr", "1e-3", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 0.0 <= summary["heldout"]["pairwise_accuracy"] <= 1.0
