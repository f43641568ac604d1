"""The TAWP recipe's model stages on the tiny models, through their command lines: reward (GenARM + NLL), gate B,
the feature cache, and both router objectives. Scripted "base" samples stand in for the on-policy sampling stage."""

from __future__ import annotations

import json

import pytest

from router_training import gates, general, onpolicy, recipe_report, tawp
from router_training.__main__ import main
from router_training.data import save_records
from taro_vllm.checkpoint import load_router


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    """pairs_*.jsonl / correct_*.jsonl / gold_*.jsonl as the onpolicy stage writes them, from scripted samples."""
    out = tmp_path_factory.mktemp("tawp")
    splits = tawp.make_splits({"reward": 12, "router": 8})
    for name, probs in splits.items():
        samples = []
        for p in probs:
            wrong_last = p.gold_solution().replace(f"= {p.steps[-1].c}", f"= {p.steps[-1].c + 1}")
            wrong_op = p.gold_solution().replace(f" {p.steps[0].op} ", " + " if p.steps[0].op != "+" else " - ", 1)
            samples.append([p.gold_solution(), wrong_last, wrong_op])
        data = onpolicy.build_records(probs, samples)
        onpolicy.write(out, name, data)
        save_records(out / f"gold_{name}.jsonl", onpolicy.gold_solutions(probs))
    return out


def test_reward_gate_and_routers_from_the_command_line(tmp_path, tiny_paths, run_data, capsys):
    base = str(tiny_paths["tiny-llama-base"])
    reward_dir = tmp_path / "reward"
    assert main(["reward", "--model", base, "--data", str(run_data / "pairs_reward.jsonl"), "--out", str(reward_dir),
                 "--beta", "0.1", "--nll-weight", "1.0", "--lr", "1e-3", "--max-steps", "4", "--batch-size", "4",
                 "--max-len", "384", "--heldout-fraction", "0.2", "--eval-every", "4", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (reward_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all("chosen_nll" in r for r in rows if r["split"] == "train")

    res = gates.gate_b(base, str(reward_dir), str(run_data / "pairs_router.jsonl"),
                       str(run_data / "correct_router.jsonl"), max_pairs=8, max_traces=4)
    assert res["pairs"] == 8 and res["divergent_pairs"] > 0
    assert set(res["flip_rate"]) == {"0", "0.25", "0.5", "1"}
    assert res["trace_nll_reward"] > 0 and isinstance(res["passed"], bool)

    cache = tmp_path / "cache"
    assert main(["features", "--base", base, "--reward", str(reward_dir), "--data",
                 str(run_data / "correct_router.jsonl"), "--data", str(run_data / "gold_router.jsonl"),
                 "--pairs", str(run_data / "pairs_router.jsonl"), "--out", str(cache)]) == 0
    # The general stage's answers (scripted here) get their own cache, from the same two models.
    prompts = general.make_prompts(6)
    save_records(run_data / "general.jsonl", general.records(prompts, [["A kind answer."], ["Hello there!"]] * 3))
    assert main(["features", "--base", base, "--reward", str(reward_dir), "--data", str(run_data / "general.jsonl"),
                 "--out", str(tmp_path / "cache_general")]) == 0
    for objective in ("nll", "nll+pref"):
        out = tmp_path / f"router_{objective.replace('+', '_')}"
        capsys.readouterr()
        assert main(["fit-router", "--cache", str(cache), "--out", str(out), "--objective", objective,
                     "--steps", "20", "--no-progress"]
                    + (["--general-cache", str(tmp_path / "cache_general")] if objective == "nll+pref" else [])) == 0
        printed = json.loads(capsys.readouterr().out)
        assert set(printed["gate_c"]) == {"oracle_gain_over_best_fixed", "router_gap_closed", "passed"}
        assert "digits" in printed["a_by_class"]
        router, cfg = load_router(out)  # a servable checkpoint that names both models
        assert cfg.reward_model == str(reward_dir.resolve()) and cfg.router.kind == "topk"
        report = json.loads((out / "train" / "report.json").read_text())
        assert report["objective"] == objective
        if objective == "nll+pref":
            assert report["train_pairs"] > 0 and "pref_accuracy" in report["eval"]
            assert report["general_train_rows"] > 0 and report["eval"]["general"]["rows"] > 0
        else:
            assert report["general_train_rows"] == 0 and "general" not in report["eval"]
    # The recipe's report reads every router's numbers back from the run folder.
    lines = recipe_report.routers(tmp_path)
    assert len(lines) == 2 and all("Gate C" in line for line in lines)
    assert ["General text" in line for line in lines] == [False, True]  # router_nll, router_nll_pref


def test_the_report_totals_the_recipe_without_superseded_attempts_or_the_ablation(tmp_path):
    rows = [("onpolicy", 600), ("router_nll (before X: superseded)", 60), ("reward_genarm", 300), ("accuracy", 1200),
            ("features_full", 120), ("router_full_lr1e-5", 480)]
    (tmp_path / "timings.jsonl").write_text("".join(json.dumps({"stage": s, "seconds": t}) + "\n" for s, t in rows))
    table = "\n".join(recipe_report.timings(tmp_path))
    assert "current stages** (no superseded attempt, no ablation, no FULL=1) | **30.0 min**" in table
    assert "| the FULL=1 stages (full-logits routers) | 10.0 min |" in table
    assert "| everything above | 46.0 min |" in table
