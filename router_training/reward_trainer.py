"""The autoregressive reward model (GenARM): a causal LM whose summed step log-prob is the step's reward.

Loss on a pair with a shared prefix: ``-log sigmoid(beta * (sum log p(chosen | prefix) - sum log p(rejected |
prefix)))``, no reference model. Optionally ``+ nll_weight * mean-token NLL of the chosen step`` (a documented
deviation from GenARM, "DPO + NLL" style): it keeps the reward model's own probability of the right step rising, which
a router trained on the likelihood of the mix needs; ``nll_weight=0`` is pure GenARM.

Full fine-tune or LoRA (merged before saving, so the output is a plain model that vLLM loads). The held-out split (grouped by problem) reports pairwise accuracy and the mean margin.

Output, ``--out DIR``: the reward model itself (``config.json``, ``model.safetensors``, tokenizer) plus
``DIR/train/{metrics.jsonl,curves.png,state/}``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from router_training import checkpointing, runtime
from router_training.data import StepPair, load_step_pairs, split_by_group
from router_training.encoding import Batch, Encoder, batch_indices, collate, scored_logprobs
from router_training.errors import DataError, TrainingSetupError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RewardTrainConfig:
    model: str  # causal LM folder to start from
    data: list[str]  # Math-Step-DPO files (JSONL / Parquet)
    out: str
    beta: float = 0.05
    nll_weight: float = 0.0  # 0 = pure GenARM
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_last_layers: int | None = None  # adapters on the top N layers only: backward stops there (CPU budget)
    lr: float = 1e-5
    warmup: int = 10
    weight_decay: float = 0.0
    batch_size: int = 4  # pairs per step (2x sequences in the one forward)
    max_steps: int = 100
    max_len: int = 256
    heldout_fraction: float = 0.1
    max_eval_pairs: int = 256
    eval_every: int = 25
    checkpoint_every: int = 25
    seed: int = 0
    chat_template: bool = True
    device: str | None = None
    resume: bool = False
    keep_state: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop (as if killed) after this many steps; for tests of --resume
    max_train_pairs: int | None = None


@dataclass
class RewardResult:
    model_dir: Path
    steps: int
    eval: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    finished: bool = True


def pair_logps(model, enc: Encoder, pairs: list[StepPair], device,
               with_counts: bool = False) -> tuple[torch.Tensor, ...]:
    """Summed step log-probs of chosen and rejected: ONE forward over the 2B sequences (and, ``with_counts``, the
    number of tokens of each chosen step)."""
    encoded = [enc.pair(p) for p in pairs]
    parts = [(cc, c) for cc, c, _, _ in encoded] + [(cr, r) for _, _, cr, r in encoded]
    batch: Batch = collate(parts, enc.pad_id).to(device)
    # Only positions whose logits predict a scored token (in any row) go through the LM head: the prompt is most of
    # each sequence, and the [B, T, V] head output and its log-softmax dominate memory (and time for small models).
    keep = batch.target_mask[:, 1:].any(0).nonzero().squeeze(1)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    mask = batch.target_mask[:, keep + 1]
    lp = scored_logprobs(logits, batch.input_ids[:, keep + 1], mask).sum(-1)
    n = len(pairs)
    if with_counts:
        return lp[:n], lp[n:], mask[:n].sum(-1)
    return lp[:n], lp[n:]


def preference_loss(lp_c: torch.Tensor, lp_r: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (lp_c - lp_r)).mean()


@torch.no_grad()
def evaluate(model, enc: Encoder, pairs: list[StepPair], beta: float, batch_size: int, device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    margins = []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, enc, pairs[i: i + batch_size], device)
        margins.append((c - r).float().cpu())
    model.train(was_training)
    m = torch.cat(margins)
    return {"pairwise_accuracy": float((m > 0).float().mean()), "margin": float(m.mean()),
            "loss": float(-F.logsigmoid(beta * m).mean()), "pairs": len(pairs)}


def _load_pairs(cfg: RewardTrainConfig) -> tuple[list[StepPair], list[StepPair]]:
    if not cfg.data:
        raise DataError("no data file given; pass --data FILE (Math-Step-DPO JSONL or Parquet)")
    pairs = [p for path in cfg.data for p in load_step_pairs(path)]
    train, held = split_by_group(pairs, cfg.heldout_fraction, cfg.seed)
    if not train:
        raise DataError(f"no training pairs left after holding out {cfg.heldout_fraction:.0%} of the problems")
    if cfg.max_train_pairs:
        train = train[: cfg.max_train_pairs]
    return train, held[: cfg.max_eval_pairs]


def _wrap_lora(model, cfg: RewardTrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainingSetupError("--lora needs peft: pip install 'taro-vllm[train]'") from None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    layers = None
    if cfg.lora_last_layers:
        n = model.config.num_hidden_layers
        layers = list(range(max(0, n - cfg.lora_last_layers), n))
    # lora_dropout=0: dropout would make the run depend on RNG state that the checkpoint does not carry.
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=targets, layers_to_transform=layers,
                                            task_type="CAUSAL_LM"))


def train_reward(cfg: RewardTrainConfig) -> RewardResult:
    t0 = time.time()
    out = Path(cfg.out).expanduser()
    run = out / "train"
    model_path = runtime.check_model_dir(cfg.model, "reward model start point")
    train_pairs, held = _load_pairs(cfg)
    device, dtype = runtime.pick_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    tok = runtime.load_tokenizer(model_path)
    enc = Encoder(tok, cfg.max_len, cfg.chat_template)
    model = runtime.load_causal_lm(model_path, device, dtype)
    model.config.use_cache = False
    if cfg.lora:
        model = _wrap_lora(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run_cfg = _state_config(cfg)

    start = 0
    if cfg.resume and checkpointing.has_state(run):
        start = checkpointing.load_state(run, model, opt, run_cfg)["step"]
    log = runtime.MetricsLog(run / "metrics.jsonl", start if cfg.resume else None)

    def do_eval(step: int) -> dict[str, float]:
        if not held:
            return {}
        ev = evaluate(model, enc, held, cfg.beta, cfg.batch_size, device)
        log.write({"step": step, "split": "eval", **ev})
        return ev

    if start == 0:
        do_eval(0)
    bar = tqdm(total=cfg.max_steps, initial=start, desc="reward", disable=not cfg.progress, dynamic_ncols=True)
    step = start
    ev: dict[str, float] = {}
    while step < cfg.max_steps:
        if cfg.stop_after is not None and step - start >= cfg.stop_after:
            bar.close()
            return RewardResult(out, step, {}, time.time() - t0, finished=False)
        for g in opt.param_groups:
            g["lr"] = runtime.lr_at(step, cfg.lr, cfg.warmup)
        batch = [train_pairs[i] for i in batch_indices(len(train_pairs), cfg.batch_size, step, cfg.seed)]
        lp_c, lp_r, n_c = pair_logps(model, enc, batch, device, with_counts=True)
        loss = preference_loss(lp_c, lp_r, cfg.beta)
        nll = -(lp_c.sum() / n_c.sum().clamp(min=1))
        if cfg.nll_weight:
            loss = loss + cfg.nll_weight * nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        margin = (lp_c - lp_r).detach()
        row = {"step": step, "split": "train", "loss": float(loss.detach()), "margin": float(margin.mean()),
               "pairwise_accuracy": float((margin > 0).float().mean()), "lr": opt.param_groups[0]["lr"],
               "grad_norm": float(gnorm), "chosen_nll": float(nll.detach())}
        if not math.isfinite(row["loss"]):
            raise TrainingSetupError(f"reward loss became {row['loss']} at step {step}; lower --lr")
        log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['margin']:.2f}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            ev = do_eval(step)
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            checkpointing.save_state(run, model, opt, step, run_cfg)
    bar.close()
    _save_model(model, tok, out, cfg.lora)
    runtime.plot_curves(log.rows, run / "curves.png", "reward model (GenARM)",
                        [("train", ["loss", "pairwise_accuracy"]), ("eval", ["loss", "pairwise_accuracy"])])
    if not cfg.keep_state:
        checkpointing.clear_state(run)
    return RewardResult(out, step, ev, time.time() - t0)


def _state_config(cfg: RewardTrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "device")}


def _save_model(model, tok, out: Path, lora: bool) -> None:
    if lora:
        model = model.merge_and_unload()  # a plain model: vLLM cannot serve unmerged adapters of a reward model
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def trained_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The saved reward model's tensors (what the resume test compares)."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))
