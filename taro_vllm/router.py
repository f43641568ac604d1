"""The TARo router: reads base and reward logits, returns the mixing weight a_t in (0, 1) per row.

Two variants behind one interface (``router(z_base, z_reward) -> a``, shapes ``[N, V], [N, V] -> [N]``; and
``router.weight(z_base, z_reward) -> RouterWeight``, the same a plus the row statistics computed on the way, which is
what :mod:`taro_vllm.mix` calls):

* ``topk`` (default): the top-K entries of the two models as *log-probabilities* plus a learnable embedding of each
  selected token id, through a small MLP.  Log-probabilities rather than raw logits because they are invariant to
  the per-row shift of each model's logits, so a router trained next to one base size can read the logits of a
  bigger base of the same vocabulary.  The token-index embeddings let the router learn *which* tokens are in play
  (digits, operators, "Step") without reading the whole vocabulary.
* ``full``: both full log-prob vectors concatenated (2V inputs), through an MLP.  Expensive by design; it is the
  paper's other variant and exists to be compared against ``topk``.

Conditioning (checkpoint format 2): a fresh router outputs a_t = sigmoid(init_bias) = 0.1 on every row, and its
first layer reads log-probs multiplied by ``input_scale`` (0.1); the full-logits router reads them row-centred
(its 2V-value input row minus that row's mean), so the level both models share (about -20 nats on an LM) is not an
input while their difference in level (which model is more peaked) still is.  First-layer weights are drawn so the
pre-activation std is about 1 on LM-like rows.  Format 1 fed unscaled log-probs in [-50, 0] from a = 0.5: the hidden
layer was large, so a few Adam steps on the output layer moved a_t's logit by tens of units (saturation), and the
full router's first layer started with pre-activation std about 22-24.

Feature extraction lives in :mod:`taro_vllm.features` (below this module and :mod:`taro_vllm.mix`) so serving and
training share it bit for bit.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from taro_vllm.features import RouterWeight, TopKFeatures, full_logprobs, topk_features


INIT_ALPHA = 0.1  # a_t of a freshly initialised router: mostly the base, room to move both ways
DEFAULT_INIT_BIAS = math.log(INIT_ALPHA / (1.0 - INIT_ALPHA))  # logit(0.1) = -2.197...


class RouterConfig(BaseModel):
    """Router hyper-parameters; stored verbatim in the checkpoint's ``config.json``.

    Defaults (K=8, source="both", embed_dim=16, hidden_dim=64) follow the paper's observation that a_t is decided
    by a handful of candidate tokens: K=8 covers nearly all the probability mass of an instruction-tuned model while
    keeping the top-K selection (the dominant cost of this router) cheap; "both" lets the router see tokens that
    only the reward model proposes, which is where it matters whether to trust it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["topk", "full"] = "topk"
    vocab_size: int = Field(gt=0)
    k: int = Field(default=8, gt=0, description="top-K entries per model (topk router)")
    source: Literal["base", "reward", "both"] = Field(
        default="both", description="whose top-K ids are read: the base's, the reward's, or both (2K slots)"
    )
    embed_dim: int = Field(default=16, ge=0, description="token-index embedding size; 0 disables embeddings")
    hidden_dim: int = Field(default=64, gt=0)
    init_bias: float = Field(
        default=DEFAULT_INIT_BIAS, description="initial output logit: sigmoid(init_bias) is the start a_t (0.1)"
    )
    input_scale: float = Field(
        default=0.1,
        gt=0,
        description="multiplies the log-prob inputs (top-K: clamped log-probs; full: row-centred clamped log-probs); "
        "the first layer's init divides by it, so it sets how fast training moves the first layer, not its start",
    )

    @property
    def slots(self) -> int:
        """Number of selected token ids per row."""
        return 2 * self.k if self.source == "both" else self.k


LOGP_FLOOR = -50.0


# Typical root-mean-square of each router's raw log-prob inputs on an LM row (SmolLM2, synthetic peaked rows):
# top-K log-probs sit between 0 and about -25 nats; a full row's log-probs spread about 2 nats around their mean.
# Used only to draw first-layer weights that give a pre-activation std of about 1 at init.
TOPK_LOGP_RMS = 10.0
FULL_CENTRED_LOGP_RMS = 2.0


def _clamp_logp(logp: torch.Tensor) -> torch.Tensor:
    # Masked (-inf) or vanishing tokens all read as "very unlikely": keeps the MLP finite and its inputs bounded.
    return logp.clamp(min=LOGP_FLOOR)


def _linear_std(layer: nn.Linear) -> float:
    # std of nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return 1.0 / math.sqrt(3 * layer.in_features)


def _target_std(n_inputs: int, input_rms: float) -> float:
    # Weight std giving pre-activation std 1 from n_inputs inputs of root-mean-square input_rms.
    return 1.0 / (math.sqrt(n_inputs) * input_rms)


def _init_head(mlp: nn.Sequential, init_bias: float) -> None:
    # Zero output weights: every row starts at exactly sigmoid(init_bias), whatever the inputs.
    nn.init.zeros_(mlp[-1].weight)
    nn.init.constant_(mlp[-1].bias, init_bias)


class TopKRouter(nn.Module):
    """MLP over per-slot (base log-prob, reward log-prob, token embedding) for the top-K token ids."""

    def __init__(self, cfg: RouterConfig):
        super().__init__()
        assert cfg.kind == "topk"
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim) if cfg.embed_dim else None
        per_slot = 2 + cfg.embed_dim
        self.mlp = nn.Sequential(
            nn.Linear(cfg.slots * per_slot, cfg.hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.hidden_dim, 1),
        )
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)
        # First layer std 1/sqrt(n) per input group (n = the group's columns), the log-prob columns further divided
        # by their inputs' typical rms (input_scale * TOPK_LOGP_RMS): pre-activation std about 1 at init, whatever
        # input_scale is; input_scale then sets how fast Adam moves the first layer (per-step change ~ lr * |x|).
        # nn.Linear's own uniform draw is rescaled, so the init uses the same random numbers as format 1.
        first = self.mlp[0]
        is_logp = (torch.arange(first.in_features) % per_slot) < 2
        with torch.no_grad():
            w = first.weight
            w[:, is_logp] *= _target_std(int(is_logp.sum()), cfg.input_scale * TOPK_LOGP_RMS) / _linear_std(first)
            if (~is_logp).any():
                w[:, ~is_logp] *= _target_std(int((~is_logp).sum()), 1.0) / _linear_std(first)
            first.bias.zero_()
        _init_head(self.mlp, cfg.init_bias)

    def _inputs(self, feats: TopKFeatures) -> torch.Tensor:
        s = self.cfg.input_scale
        parts = [(_clamp_logp(feats.logp_base) * s).unsqueeze(-1), (_clamp_logp(feats.logp_reward) * s).unsqueeze(-1)]
        if self.embed is not None:
            parts.append(self.embed(feats.ids).float())
        return torch.cat(parts, dim=-1).flatten(1).to(self.mlp[0].weight.dtype)

    def forward_features(self, feats: TopKFeatures) -> torch.Tensor:
        """a_t from precomputed features (:meth:`weight` and the feature-cache trainer call this)."""
        return torch.sigmoid(self.mlp(self._inputs(feats)).squeeze(-1).float())

    def weight(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> RouterWeight:
        """a_t and the two row logsumexps the features computed (the mix reuses them to flag NaN/+inf rows)."""
        feats = topk_features(z_base, z_reward, self.cfg.k, self.cfg.source)
        return RouterWeight(self.forward_features(feats), (feats.lse_base, feats.lse_reward))

    def pre_activation(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> torch.Tensor:
        """The first layer's output before the SiLU, [N, hidden_dim] (diagnostics: its std is about 1 at init)."""
        return self.mlp[0](self._inputs(topk_features(z_base, z_reward, self.cfg.k, self.cfg.source)))

    def forward(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> torch.Tensor:
        return self.forward_features(topk_features(z_base, z_reward, self.cfg.k, self.cfg.source))


class FullRouter(nn.Module):
    """MLP over the concatenated full log-prob vectors of both models (2V inputs)."""

    def __init__(self, cfg: RouterConfig):
        super().__init__()
        assert cfg.kind == "full"
        self.cfg = cfg
        self.mlp = nn.Sequential(
            nn.Linear(2 * cfg.vocab_size, cfg.hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.hidden_dim, 1),
        )
        # Inputs are row-centred log-probs * input_scale, typical rms input_scale * FULL_CENTRED_LOGP_RMS; weights
        # of std 1/sqrt(2V) divided by that rms give a pre-activation std of about 1 at init (as in TopKRouter).
        first = self.mlp[0]
        with torch.no_grad():
            target = _target_std(2 * cfg.vocab_size, cfg.input_scale * FULL_CENTRED_LOGP_RMS)
            first.weight *= target / _linear_std(first)
            first.bias.zero_()
        _init_head(self.mlp, cfg.init_bias)

    def _first_layer(self, logp_base: torch.Tensor, logp_reward: torch.Tensor) -> torch.Tensor:
        # The input row is [log p_base, log p_reward] (2V values), clamped, minus that row's mean, times input_scale:
        # the level both models share (about -20 nats) is dropped, their difference in level (which one is more
        # peaked) is kept.  Centred in fp32 before any cast (bf16 rounds -20 in 0.06 steps), in place on the
        # clamp's fresh tensors.  First layer split in two halves: no [N, 2V] concatenation.
        lb, lr = _clamp_logp(logp_base.float()), _clamp_logp(logp_reward.float())
        level = (lb.mean(dim=-1, keepdim=True) + lr.mean(dim=-1, keepdim=True)) / 2
        scale = self.cfg.input_scale
        dtype = self.mlp[0].weight.dtype
        lb = lb.sub_(level).mul_(scale).to(dtype)
        lr = lr.sub_(level).mul_(scale).to(dtype)
        w = self.mlp[0].weight
        v = self.cfg.vocab_size
        return lb @ w[:, :v].T + lr @ w[:, v:].T + self.mlp[0].bias

    def forward_logprobs(self, logp_base: torch.Tensor, logp_reward: torch.Tensor) -> torch.Tensor:
        """a_t from both full log-prob rows (:meth:`weight` calls this)."""
        out = self.mlp[2](self.mlp[1](self._first_layer(logp_base, logp_reward)))
        return torch.sigmoid(out.squeeze(-1).float())

    def weight(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> RouterWeight:
        """a_t; no row statistics (log_softmax's row sums are not returned: the mix checks the mixed row instead)."""
        return RouterWeight(self.forward_logprobs(*full_logprobs(z_base, z_reward)))

    def pre_activation(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> torch.Tensor:
        """The first layer's output before the SiLU, [N, hidden_dim] (diagnostics: its std is about 1 at init)."""
        return self._first_layer(*full_logprobs(z_base, z_reward))

    def forward(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> torch.Tensor:
        return self.forward_logprobs(*full_logprobs(z_base, z_reward))


Router = TopKRouter | FullRouter


def build_router(cfg: RouterConfig) -> Router:
    return TopKRouter(cfg) if cfg.kind == "topk" else FullRouter(cfg)
