"""The TARo router: reads base and reward logits, returns the mixing weight a_t in (0, 1) per row.

Two variants behind one interface (``router(z_base, z_reward) -> a``, shapes ``[N, V], [N, V] -> [N]``):

* ``topk`` (default): the top-K entries of the two models as *log-probabilities* plus a learnable embedding of each
  selected token id, through a small MLP.  Log-probabilities rather than raw logits because they are invariant to
  the per-row shift of each model's logits, so a router trained next to one base size can read the logits of a
  bigger base of the same vocabulary.  The token-index embeddings let the router learn *which* tokens are in play
  (digits, operators, "Step") without reading the whole vocabulary.
* ``full``: both full log-prob vectors concatenated (2V inputs), through an MLP.  Expensive by design; it is the
  paper's other variant and exists to be compared against ``topk``.

Feature extraction lives in :mod:`taro_vllm.mix` so the fused serving path and training share it bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from taro_vllm import mix


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
    init_bias: float = Field(default=0.0, description="initial output logit: sigmoid(init_bias) is the start a_t")

    @property
    def slots(self) -> int:
        """Number of selected token ids per row."""
        return 2 * self.k if self.source == "both" else self.k


LOGP_FLOOR = -50.0


def _clamp_logp(logp: torch.Tensor) -> torch.Tensor:
    # Masked (-inf) or vanishing tokens all read as "very unlikely": keeps the MLP finite and its inputs bounded.
    return logp.clamp(min=LOGP_FLOOR)


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
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, cfg.init_bias)

    def forward_features(self, feats: mix.TopKFeatures) -> torch.Tensor:
        """a_t from precomputed features (the fused serving path calls this)."""
        dtype = self.mlp[0].weight.dtype
        parts = [_clamp_logp(feats.logp_base).unsqueeze(-1), _clamp_logp(feats.logp_reward).unsqueeze(-1)]
        if self.embed is not None:
            parts.append(self.embed(feats.ids).float())
        x = torch.cat(parts, dim=-1).flatten(1).to(dtype)
        return torch.sigmoid(self.mlp(x).squeeze(-1).float())

    def forward(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> torch.Tensor:
        return self.forward_features(mix.topk_features(z_base, z_reward, self.cfg.k, self.cfg.source))


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
        nn.init.normal_(self.mlp[0].weight, std=(2 * cfg.vocab_size) ** -0.5)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, cfg.init_bias)

    def forward_logprobs(self, logp_base: torch.Tensor, logp_reward: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        # First layer split in two halves: avoids materialising the [N, 2V] concatenation.
        w = self.mlp[0].weight
        v = self.cfg.vocab_size
        lb = _clamp_logp(logp_base).to(dtype)
        lr = _clamp_logp(logp_reward).to(dtype)
        h = lb @ w[:, :v].T + lr @ w[:, v:].T + self.mlp[0].bias
        out = self.mlp[2](self.mlp[1](h))
        return torch.sigmoid(out.squeeze(-1).float())

    def forward(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> torch.Tensor:
        return self.forward_logprobs(*mix.full_logprobs(z_base, z_reward))


Router = TopKRouter | FullRouter


def build_router(cfg: RouterConfig) -> Router:
    return TopKRouter(cfg) if cfg.kind == "topk" else FullRouter(cfg)
