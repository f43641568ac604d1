"""A cache of what the router needs from the two frozen models, so router epochs and ablations take seconds.

One forward of each model per sequence; then, at every scored position (a row), the cache keeps:

* the router's inputs: the top-K ids of each model and both models' log-probs there (``mix.TopKFeatures``);
* the mixed NLL as an exact function of ``a``: both models' logits on a support S (the union of each model's top-M
  and the target), and the log-mass OUTSIDE S of the mix at a grid of ``a`` values. Then
  ``lse_V(mix(a)) = logaddexp(lse_S(mix(a)), rest(a))`` with ``rest`` interpolated linearly between grid points:
  exact on S, and off S the mass is small and smooth in ``a`` (tested against the full-vocabulary NLL to 1e-3);
* optionally (``full_rows``, for the full-logits router) both models' whole log-prob rows, clamped at the router's
  floor and stored in fp16 (0.03-nat steps at -50; the router centres and scales them by 0.1): ~200 KB per row at
  V = 49152, so a few GB for a TAWP run, where the top-K cache is tens of MB;
* per-row labels: the target's token class (for a_t by class), whether the row is *informative* (the models'
  argmaxes differ, their Jensen-Shannon divergence exceeds ``js_threshold``, or the target is a digit / operator /
  "=" of a checked line), the sequence it belongs to, and for preference rows the pair and side.

Stored as safetensors shards (``shard_00000.safetensors`` ...) + ``cache.json``; a killed build resumes at the next
missing shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from router_training import tawp
from router_training.encoding import collate
from taro_vllm import mix
from taro_vllm.features import full_logprobs
from taro_vllm.router import LOGP_FLOOR

LogitSource = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CLASSES = ("digits", "operators", "=", "step words", "names/items", "other words", "punctuation", "whitespace",
           "eos")
CHECKED_CLASSES = ("digits", "operators", "=")


@dataclass
class CacheConfig:
    k: int = 8  # router top-K per model (the router reads 2K slots: source "both")
    support: int = 64  # top-M per model kept exactly for the NLL
    grid: int = 21  # a grid for the off-support mass: 0, 0.05, ..., 1
    js_threshold: float = 0.02
    shard_sequences: int = 64
    full_rows: bool = False  # also keep both full log-prob rows (fp16): what the full-logits router reads


@dataclass
class Example:
    context: list[int]
    scored: list[int]
    context_words: tuple[str, ...] = ()
    pair: int = -1  # preference rows: index of the pair, side 0 = chosen, 1 = rejected
    side: int = -1
    group: str = ""  # problem id (validation split by problem)


def _rows(base: LogitSource, reward: LogitSource, examples: Sequence[Example], pad_id: int):
    batch = collate([(e.context, e.scored) for e in examples], pad_id)
    with torch.no_grad():
        zb = base(batch.input_ids, batch.attention_mask).float()
        zr = mix.align_vocab(reward(batch.input_ids, batch.attention_mask).float(), zb)
    sel = batch.target_mask[:, 1:]
    seq = torch.arange(len(examples)).unsqueeze(1).expand_as(sel)[sel]
    return zb[:, :-1][sel], zr[:, :-1][sel], batch.input_ids[:, 1:][sel], seq


def rest_mass(zb: torch.Tensor, zr: torch.Tensor, support: torch.Tensor,
              grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log sum over v NOT in the support of exp((1-a) zb_v + a zr_v) and its derivative in a, at each a of the
    grid: ([N, G], [N, G]). The derivative is the off-support softmax mean of (zr - zb)."""
    values, slopes = [], []
    diff = zr - zb
    for a in grid.tolist():
        zm = (1 - a) * zb + a * zr
        zm.scatter_(1, support, float("-inf"))
        lse = torch.logsumexp(zm, dim=-1)
        p = torch.exp(zm - lse[:, None]).nan_to_num(0.0)
        values.append(lse)
        slopes.append((p * diff).sum(-1))
    # Finite, so interpolation never makes 0 * inf; an empty rest has no slope.
    return torch.stack(values, dim=1).clamp(min=-1e4), torch.stack(slopes, dim=1).nan_to_num(0.0)


def js_divergence(zb: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
    lb, lr = torch.log_softmax(zb, -1), torch.log_softmax(zr, -1)
    lm = torch.logaddexp(lb, lr) - torch.log(torch.tensor(2.0))
    return 0.5 * ((lb.exp() * (lb - lm)).sum(-1) + (lr.exp() * (lr - lm)).sum(-1))


def featurize(zb: torch.Tensor, zr: torch.Tensor, targets: torch.Tensor, cfg: CacheConfig) -> dict[str, torch.Tensor]:
    feats = mix.topk_features(zb, zr, cfg.k, "both")
    m = min(cfg.support, zb.shape[-1])
    support = torch.cat([torch.topk(zb, m, -1).indices, torch.topk(zr, m, -1).indices, targets[:, None]], 1)
    support, _ = support.sort(dim=1)
    valid = torch.ones_like(support, dtype=torch.bool)
    valid[:, 1:] = support[:, 1:] != support[:, :-1]  # each id once in the support's logsumexp
    grid = torch.linspace(0, 1, cfg.grid)
    rest, rest_slope = rest_mass(zb, zr, support, grid)
    return {
        "ids": feats.ids, "lp_base": feats.logp_base, "lp_reward": feats.logp_reward,
        "support": support, "support_valid": valid,
        "zb_support": zb.gather(1, support), "zr_support": zr.gather(1, support),
        "zb_target": zb.gather(1, targets[:, None]).squeeze(1), "zr_target": zr.gather(1, targets[:, None]).squeeze(1),
        "rest": rest, "rest_slope": rest_slope,
        "disagree": zb.argmax(-1) != zr.argmax(-1),
        "js": js_divergence(zb, zr),
        "targets": targets,
        **(full_rows(zb, zr) if cfg.full_rows else {}),
    }


def full_rows(zb: torch.Tensor, zr: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both models' log-prob rows as the full-logits router reads them (clamped at its floor), in fp16."""
    lb, lr = full_logprobs(zb, zr)
    return {"lpf_base": lb.clamp(min=LOGP_FLOOR).half(), "lpf_reward": lr.clamp(min=LOGP_FLOOR).half()}


def cached_nll(rows: dict[str, torch.Tensor], alpha: torch.Tensor | float) -> torch.Tensor:
    """Per-row NLL of the target under softmax((1-a) z_base + a z_reward), from the cache; differentiable in a."""
    a = torch.as_tensor(alpha, dtype=torch.float32)
    if a.dim() == 0:
        a = a.expand(rows["zb_target"].shape[0])
    zs = (1 - a)[:, None] * rows["zb_support"] + a[:, None] * rows["zr_support"]
    lse_s = torch.logsumexp(zs.masked_fill(~rows["support_valid"], float("-inf")), dim=-1)
    r = _hermite(rows["rest"], rows["rest_slope"], a)
    return torch.logaddexp(lse_s, r) - ((1 - a) * rows["zb_target"] + a * rows["zr_target"])


def cached_kl_to_base(rows: dict[str, torch.Tensor], alpha: torch.Tensor | float) -> torch.Tensor:
    """Per-row KL(p_base || p_mix(a)) from the cache; differentiable in a. Exact on the support; the mass outside it
    counts as one lumped outcome (a lower bound of its share, tight when both models spread it alike). Zero at a = 0.

    Why KL and not the NLL of sampled text: on the base's own answers the expected NLL of the mix is minimised by
    the base, but one sample per position is noisy and a greedy sample rewards any sharpening (a > 0 wherever the
    reward model is more confident of the same token); the KL is that expectation, computed exactly."""
    a = torch.as_tensor(alpha, dtype=torch.float32)
    if a.dim() == 0:
        a = a.expand(rows["zb_target"].shape[0])
    valid = rows["support_valid"]
    zb = rows["zb_support"].masked_fill(~valid, float("-inf"))
    zm = ((1 - a)[:, None] * rows["zb_support"] + a[:, None] * rows["zr_support"]).masked_fill(~valid, float("-inf"))
    rest_b = rows["rest"][:, 0]  # the grid starts at a = 0: the base's own off-support log-mass
    rest_m = _hermite(rows["rest"], rows["rest_slope"], a)
    lse_b = torch.logaddexp(torch.logsumexp(zb, -1), rest_b)
    lse_m = torch.logaddexp(torch.logsumexp(zm, -1), rest_m)
    lp_b = zb - lse_b[:, None]
    on_support = (lp_b.exp() * (lp_b - (zm - lse_m[:, None]))).masked_fill(~valid, 0.0).sum(-1)
    lp_rest_b = rest_b - lse_b
    return on_support + lp_rest_b.exp() * (lp_rest_b - (rest_m - lse_m))


def _hermite(values: torch.Tensor, slopes: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite interpolation of per-row curves sampled on an even grid over [0, 1] (error O(h^4))."""
    g = values.shape[1] - 1
    h = 1.0 / g
    x = a.clamp(0, 1) * g
    i0 = x.detach().floor().clamp(0, g - 1).long()[:, None]
    t = (x - i0.squeeze(1))
    y0, y1 = values.gather(1, i0).squeeze(1), values.gather(1, i0 + 1).squeeze(1)
    m0, m1 = slopes.gather(1, i0).squeeze(1), slopes.gather(1, i0 + 1).squeeze(1)
    t2, t3 = t * t, t * t * t
    return ((2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + t) * h * m0 + (-2 * t3 + 3 * t2) * y1
            + (t3 - t2) * h * m1)


def topk_features(rows: dict[str, torch.Tensor]) -> mix.TopKFeatures:
    n = rows["ids"].shape[0]
    z = torch.zeros(n)
    return mix.TopKFeatures(rows["ids"], rows["lp_base"], rows["lp_reward"], z, z)


def build(out: Path, base: LogitSource, reward: LogitSource, examples: Sequence[Example], tokenizer, pad_id: int,
          vocab_size: int, cfg: CacheConfig = CacheConfig(), batch_size: int = 8, progress: bool = True,
          info: dict | None = None) -> Path:
    """Write the cache shards (resuming at the first missing one) and ``cache.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(examples) + cfg.shard_sequences - 1) // cfg.shard_sequences
    piece_class: dict[tuple[int, tuple[str, ...]], int] = {}
    eos = tokenizer.eos_token_id

    def cls(tok_id: int, words: tuple[str, ...]) -> int:
        key = (tok_id, words)
        if key not in piece_class:
            c = "eos" if tok_id == eos else tawp.token_class(tokenizer.decode([tok_id]), words)
            piece_class[key] = CLASSES.index(c)
        return piece_class[key]

    bar = tqdm(total=len(examples), desc="feature cache", disable=not progress, dynamic_ncols=True)
    for s in range(n_shards):
        path = out / f"shard_{s:05d}.safetensors"
        chunk = examples[s * cfg.shard_sequences: (s + 1) * cfg.shard_sequences]
        if path.is_file():
            bar.update(len(chunk))
            continue
        parts = []
        for i in range(0, len(chunk), batch_size):
            ex = chunk[i: i + batch_size]
            zb, zr, y, seq = _rows(base, reward, ex, pad_id)
            f = featurize(zb, zr, y, cfg)
            f["seq"] = seq + s * cfg.shard_sequences + i
            f["cls"] = torch.tensor([cls(int(t), ex[int(q)].context_words) for t, q in zip(y, seq)])
            f["pair"] = torch.tensor([ex[int(q)].pair for q in seq], dtype=torch.long)
            f["side"] = torch.tensor([ex[int(q)].side for q in seq], dtype=torch.long)
            parts.append(f)
            bar.update(len(ex))
        shard = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
        tmp = path.with_name(path.name + ".tmp")
        save_file(shard, str(tmp))
        tmp.replace(path)  # a shard exists whole or not at all
    bar.close()
    groups = [e.group for e in examples]
    (out / "cache.json").write_text(json.dumps({"config": asdict(cfg), "shards": n_shards, "groups": groups,
                                                "classes": list(CLASSES), "vocab_size": vocab_size,
                                                **(info or {})}) + "\n")
    return out


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    meta = json.loads((path / "cache.json").read_text())
    shards = [load_file(str(path / f"shard_{s:05d}.safetensors")) for s in range(meta["shards"])]
    rows = {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}
    return rows, meta


def informative(rows: dict[str, torch.Tensor], js_threshold: float) -> torch.Tensor:
    checked = torch.zeros_like(rows["disagree"])
    for c in CHECKED_CLASSES:
        checked |= rows["cls"] == CLASSES.index(c)
    return rows["disagree"] | (rows["js"] > js_threshold) | checked


def select(rows: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[mask] for k, v in rows.items()}
