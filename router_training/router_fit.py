"""Train the TARo top-K router on a feature cache (:mod:`router_training.feature_cache`): seconds per run.

Objective (primary, ``nll``): the NLL of the mix ``softmax((1 - a_t) z_base + a_t z_reward)`` over verified-correct
traces, weighted toward informative rows (weight 1 where the models disagree or the target is a checked digit /
operator / "="; ``other_weight`` elsewhere). Why weighted: ~90% of positions are ones both models agree on, and
their gradient only says "any a is fine", which drowns the few positions where routing matters.

Variant ``nll+pref``: plus ``pref_weight`` x the preference on the mix over the router split's on-policy pairs,
``-log sigmoid(beta * (log p_mix(chosen) - log p_mix(rejected)))``: directly "the mix should prefer the corrected
line". The router split's pairs and traces are disjoint from the reward model's training pairs.

Every evaluation (held-out problems of the router split) reports the router's NLL next to each fixed a (GenARM) and
the per-token oracle a (the best a of the grid for each row), i.e. Gate C: is there anything to route? And the mean
a_t per token class. Selection between routers is done on validation *accuracy* by ``benchmarks.accuracy``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from router_training import feature_cache as fc
from router_training import runtime
from taro_vllm.checkpoint import save_router
from taro_vllm.router import Router, RouterConfig, build_router

GRID = tuple(i / 20 for i in range(21))


@dataclass
class FitConfig:
    cache: str
    out: str
    objective: Literal["nll", "nll+pref"] = "nll"
    embed_dim: int = 16
    hidden_dim: int = 64
    init_bias: float | None = None  # None: RouterConfig's default (a ≈ 0.1 at the start)
    other_weight: float = 0.1
    pref_weight: float = 0.5
    pref_beta: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    steps: int = 1000
    batch_rows: int = 512
    pair_batch: int = 16
    val_fraction: float = 0.15
    eval_every: int = 250
    seed: int = 0
    progress: bool = True


@dataclass
class FitResult:
    router: Router
    checkpoint: Path
    report: dict[str, Any] = field(default_factory=dict)


def split_groups(groups: list[str], frac: float, seed: int) -> set[str]:
    uniq = sorted(set(groups))
    random.Random(seed).shuffle(uniq)
    return set(uniq[: max(1, round(frac * len(uniq)))]) if frac > 0 and len(uniq) > 1 else set()


def router_alpha(router: Router, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return router.forward_features(fc.topk_features(rows)).float()


def weights(rows: dict[str, torch.Tensor], js: float, other: float) -> torch.Tensor:
    return torch.where(fc.informative(rows, js), 1.0, other)


def pair_loss(router: Router, rows: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference on the mix over the pairs present in ``rows``: (loss, accuracy)."""
    lp = -fc.cached_nll(rows, router_alpha(router, rows))
    pairs, inv = torch.unique(rows["pair"], return_inverse=True)
    summed = torch.zeros(len(pairs), 2).index_put_((inv, rows["side"]), lp, accumulate=True)
    margin = summed[:, 0] - summed[:, 1]
    return -F.logsigmoid(beta * margin).mean(), (margin > 0).float().mean()


@torch.no_grad()
def evaluate(router: Router, rows: dict[str, torch.Tensor], pref_rows: dict[str, torch.Tensor] | None,
             cfg: FitConfig, js: float) -> dict[str, Any]:
    router.eval()
    a = router_alpha(router, rows)
    info = fc.informative(rows, js)
    w = torch.where(info, 1.0, cfg.other_weight)
    nll = fc.cached_nll(rows, a)
    grid = torch.stack([fc.cached_nll(rows, g) for g in GRID], dim=1)  # [N, G]
    fixed_info = grid[info].mean(0)
    best = int(fixed_info.argmin())
    oracle_info = float(grid[info].min(1).values.mean())
    out: dict[str, Any] = {
        "rows": int(nll.numel()), "informative_rows": int(info.sum()),
        "nll": float(nll.mean()), "weighted_nll": float((w * nll).sum() / w.sum()),
        "nll_informative": float(nll[info].mean()), "mean_a": float(a.mean()),
        "fixed_a_nll_informative": {f"{g:.2f}": float(v) for g, v in zip(GRID, fixed_info)},
        "best_fixed_a": GRID[best], "best_fixed_nll_informative": float(fixed_info[best]),
        "base_nll_informative": float(fixed_info[0]), "oracle_nll_informative": oracle_info,
    }
    gap = out["best_fixed_nll_informative"] - oracle_info
    out["oracle_gain_over_best_fixed"] = gap / max(1e-9, out["best_fixed_nll_informative"])
    out["router_gap_closed"] = (out["best_fixed_nll_informative"] - out["nll_informative"]) / gap if gap > 0 else 0.0
    out["a_by_class"] = {c: {"mean_a": float(a[rows["cls"] == i].mean()), "rows": int((rows["cls"] == i).sum())}
                         for i, c in enumerate(fc.CLASSES) if (rows["cls"] == i).any()}
    if pref_rows is not None and pref_rows["pair"].numel():
        loss, acc = pair_loss(router, pref_rows, cfg.pref_beta)
        out["pref_loss"], out["pref_accuracy"] = float(loss), float(acc)
        base_only = -fc.cached_nll(pref_rows, 0.0)
        pairs, inv = torch.unique(pref_rows["pair"], return_inverse=True)
        s = torch.zeros(len(pairs), 2).index_put_((inv, pref_rows["side"]), base_only, accumulate=True)
        out["pref_accuracy_base"] = float((s[:, 0] > s[:, 1]).float().mean())
    router.train()
    return out


def fit(cfg: FitConfig) -> FitResult:
    t0 = time.time()
    runtime.seed_everything(cfg.seed)
    rows, meta = fc.load(Path(cfg.cache))
    ccfg = meta["config"]
    js = ccfg["js_threshold"]
    groups = meta["groups"]
    held = split_groups(groups, cfg.val_fraction, cfg.seed)
    is_val = torch.tensor([groups[int(s)] in held for s in rows["seq"]])
    is_pair = rows["pair"] >= 0
    train_nll, val_nll = fc.select(rows, ~is_pair & ~is_val), fc.select(rows, ~is_pair & is_val)
    train_pref, val_pref = fc.select(rows, is_pair & ~is_val), fc.select(rows, is_pair & is_val)
    if train_nll["targets"].numel() == 0:
        raise ValueError(f"feature cache {cfg.cache} has no training rows")
    w_train = weights(train_nll, js, cfg.other_weight)
    train_pairs = torch.unique(train_pref["pair"]).tolist()
    vocab = int(meta["vocab_size"])
    rcfg_kw: dict[str, Any] = dict(kind="topk", vocab_size=vocab, k=ccfg["k"], source="both",
                                   embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim)
    if cfg.init_bias is not None:
        rcfg_kw["init_bias"] = cfg.init_bias
    router = build_router(RouterConfig(**rcfg_kw))
    router.train()
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    log = runtime.MetricsLog(out / "train" / "metrics.jsonl", None)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_pref = cfg.objective == "nll+pref" and train_pairs
    first = evaluate(router, val_nll, val_pref, cfg, js)
    log.write({"step": 0, "split": "eval", **_flat(first)})
    bar = tqdm(range(cfg.steps), desc=f"router fit [{cfg.objective}]", disable=not cfg.progress, dynamic_ncols=True)
    last = first
    for step in bar:
        idx = torch.randint(0, train_nll["targets"].numel(), (cfg.batch_rows,), generator=gen)
        b = {k: v[idx] for k, v in train_nll.items()}
        a = router_alpha(router, b)
        w = w_train[idx]
        nll = (w * fc.cached_nll(b, a)).sum() / w.sum()
        loss = nll
        row = {"step": step + 1, "split": "train", "weighted_nll": float(nll.detach()), "mean_a": float(a.detach().mean())}
        if use_pref:
            pick = torch.tensor(random.Random(cfg.seed * 7919 + step).sample(train_pairs,
                                                                              min(cfg.pair_batch, len(train_pairs))))
            pl, pacc = pair_loss(router, fc.select(train_pref, torch.isin(train_pref["pair"], pick)), cfg.pref_beta)
            loss = loss + cfg.pref_weight * pl
            row.update(pref_loss=float(pl.detach()), pref_accuracy=float(pacc))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
        opt.step()
        if not math.isfinite(float(loss)):
            raise ValueError(f"router loss became {float(loss)} at step {step + 1}; lower --lr")
        log.write(row)
        bar.set_postfix(nll=f"{row['weighted_nll']:.3f}", a=f"{row['mean_a']:.2f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            last = evaluate(router, val_nll, val_pref, cfg, js)
            log.write({"step": step + 1, "split": "eval", **_flat(last)})
    router.eval()
    report = {"objective": cfg.objective, "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
              "train_rows": int(train_nll["targets"].numel()), "train_pairs": len(train_pairs),
              "val_groups": len(held), "eval_start": first, "eval": last, "seconds": round(time.time() - t0, 1),
              "gate_c": {"oracle_gain_over_best_fixed": last["oracle_gain_over_best_fixed"],
                         "router_gap_closed": last["router_gap_closed"],
                         "passed": last["oracle_gain_over_best_fixed"] >= 0.03}}
    save_router(out, router, tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
                base_model=meta.get("base_model"), reward_model=meta.get("reward_model"), training=report)
    (out / "train" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    runtime.plot_curves(log.rows, out / "train" / "curves.png", f"TARo router ({cfg.objective}, cached)",
                        [("train", ["weighted_nll"]), ("eval", ["nll_informative"]), ("eval", ["mean_a"])])
    return FitResult(router, out, report)


def _flat(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if not isinstance(v, dict)}
