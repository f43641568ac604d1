"""Gate B: does the reward model know something the base does not, at the base's own decision points?

On held-out on-policy pairs (problems the reward model never trained on), both frozen models are asked:

* pairwise accuracy: is sum log p(chosen) > sum log p(rejected)? (the base's own number is the bar to beat);
* flip rate: at the first token where chosen and rejected differ, does the argmax of the mix
  ``(1 - a) z_base + a z_reward`` pick the chosen token? For a = 0 this is the base itself;
* NLL per token on held-out correct traces, base vs reward (a reward model that forgot how to write the task's
  lines cannot be routed to).

``python -m router_training.gates --base B --reward R --pairs P.jsonl --correct C.jsonl --out gate_b.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from router_training import runtime
from router_training.data import load_solutions, load_step_pairs
from router_training.encoding import Encoder, collate, scored_logprobs

FLIP_ALPHAS = (0.0, 0.25, 0.5, 1.0)


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


@torch.no_grad()
def pair_metrics(base, reward, enc: Encoder, pairs, batch_size: int = 8) -> dict:
    margins = {"base": [], "reward": []}
    flips = {a: 0 for a in FLIP_ALPHAS}
    n_div = 0
    for i in range(0, len(pairs), batch_size):
        encoded = [enc.pair(p) for p in pairs[i: i + batch_size]]
        parts = [(ctx, c) for ctx, c, _, _ in encoded] + [(ctx, r) for ctx, _, _, r in encoded]
        batch = collate(parts, enc.pad_id)
        n = len(encoded)
        for name, model in (("base", base), ("reward", reward)):
            z = _logits(model, batch)
            lp = scored_logprobs(z[:, :-1], batch.input_ids[:, 1:], batch.target_mask[:, 1:]).sum(-1)
            margins[name] += (lp[:n] - lp[n:]).tolist()
        # First divergent token of each pair: the decision the reward model should flip.
        div = []
        for ctx, c, _, r in encoded:
            j = next((k for k in range(min(len(c), len(r))) if c[k] != r[k]), None)
            if j is not None:
                div.append((ctx + c[:j], [c[j]]))
        if not div:
            continue
        b2 = collate(div, enc.pad_id)
        last = b2.target_mask.float().argmax(1) - 1  # the position whose logits predict the divergent token
        rows = torch.arange(len(div))
        zb = _logits(base, b2)[rows, last]
        zr = _logits(reward, b2)[rows, last][:, : zb.shape[-1]]
        target = b2.input_ids[rows, last + 1]
        for a in FLIP_ALPHAS:
            flips[a] += int(((1 - a) * zb + a * zr).argmax(-1).eq(target).sum())
        n_div += len(div)
    acc = {k: sum(m > 0 for m in v) / max(1, len(v)) for k, v in margins.items()}
    return {"pairs": len(pairs), "pairwise_accuracy_base": acc["base"], "pairwise_accuracy_reward": acc["reward"],
            "divergent_pairs": n_div,
            "flip_rate": {f"{a:g}": flips[a] / max(1, n_div) for a in FLIP_ALPHAS}}


@torch.no_grad()
def trace_nll(model, enc: Encoder, solutions, batch_size: int = 8) -> float:
    tot, n = 0.0, 0
    for i in range(0, len(solutions), batch_size):
        batch = collate([enc.solution(s) for s in solutions[i: i + batch_size]], enc.pad_id)
        z = _logits(model, batch)
        mask = batch.target_mask[:, 1:]
        tot -= float(scored_logprobs(z[:, :-1], batch.input_ids[:, 1:], mask).sum())
        n += int(mask.sum())
    return tot / max(1, n)


def gate_b(base_dir: str, reward_dir: str, pairs_file: str, correct_file: str | None, max_pairs: int = 200,
           max_traces: int = 100, max_len: int = 384, min_reward_acc: float = 0.8, max_base_acc: float = 0.6,
           min_flip: float = 0.4) -> dict:
    device, dtype = runtime.pick_device(None)
    tok = runtime.load_tokenizer(runtime.check_model_dir(base_dir, "base model"))
    enc = Encoder(tok, max_len)
    base = runtime.load_causal_lm(Path(base_dir), device, dtype).eval()
    reward = runtime.load_causal_lm(Path(reward_dir), device, dtype).eval()
    pairs = load_step_pairs(pairs_file)[:max_pairs]
    out = pair_metrics(base, reward, enc, pairs)
    if correct_file:
        sols = load_solutions(correct_file)[:max_traces]
        out["trace_nll_base"] = trace_nll(base, enc, sols)
        out["trace_nll_reward"] = trace_nll(reward, enc, sols)
    out["thresholds"] = {"min_reward_acc": min_reward_acc, "max_base_acc": max_base_acc, "min_flip_a0.5": min_flip}
    out["passed"] = (out["pairwise_accuracy_reward"] >= min_reward_acc
                     and out["pairwise_accuracy_reward"] > out["pairwise_accuracy_base"]
                     and out["flip_rate"]["0.5"] >= min_flip)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--pairs", required=True, help="held-out on-policy pairs (JSONL)")
    p.add_argument("--correct", help="held-out verified-correct traces (JSONL)")
    p.add_argument("--max-pairs", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-fail", action="store_true", help="report only; exit 0 even if the gate fails")
    args = p.parse_args(argv)
    res = gate_b(args.base, args.reward, args.pairs, args.correct, args.max_pairs)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    if not res["passed"]:
        print("gate B FAILED: the reward model does not beat the base on held-out on-policy pairs "
              f"(reward acc {res['pairwise_accuracy_reward']:.2f}, base {res['pairwise_accuracy_base']:.2f}, "
              f"flip@0.5 {res['flip_rate']['0.5']:.2f})", file=sys.stderr)
        return 0 if args.no_fail else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
