"""The base's and the reward's log-prob of each sampled token, next to its a_t (``vllm_xargs: {"taro_alphas": true,
"taro_logprobs": true}``; responses.py puts them in the response).

The sampled token is only known after vLLM's sampler has run, after ``compute_logits``. So a step goes:

1. ``compute_logits`` (model.py) stashes here the a_t of the traced rows (``taro_trace``; ``taro_alphas`` sets one)
   and, for the rows that asked for log-probs and only for them, the log-softmax of each model's own logits (its
   full vocabulary, before the mix: ``[m, V]`` for the m rows that asked) (:meth:`SampledLogprobs.stash`), instead
   of recording their a_t at once. Untraced steps stash nothing.
2. The sampler, wrapped once per engine, hands its output to :meth:`SampledLogprobs.complete`: each asking row's
   log-probs are gathered at the token it sampled, and a_t and both log-probs are recorded together
   (``AlphaRecorder.record_sampled``: the three lists stay aligned). Rows that did not sample this step (a prefill
   chunk that is not the prompt's last one) record nothing, a_t included; vLLM discards their tokens too.

How the sampler is wrapped:

* V2 model runner: vLLM's own hook, ``ModelState.custom_sampler`` (``rows.TaroModelState``), at start-up; which rows
  sampled is the sampler output's ``num_sampled``.
* V1 model runner (CPU; GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) has no hook. At the first traced step the model
  finds the runner that called ``compute_logits`` (its caller's frame, a vLLM 0.32 internal, like
  ``rows._v1_batch_req_ids``) and wraps that runner's sampler; which rows sampled is the runner's
  ``discard_request_mask``. If the runner cannot be found, traced rows get their a_t recorded at once as before
  (a prefill chunk records one too) and null log-probs (logged; the response's summary counts them as
  ``tokens_without_logprobs``), never invented ones.

The sampler keeps its class's behaviour and attributes: it becomes an instance of a subclass that calls the original
method, then the hook (one attribute check when nothing is stashed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger("taro_vllm")

_NOT_ASKED = object()  # a row that did not ask for log-probs (alphas.AlphaRecorder.record_sampled)


def logprobs_at(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logp[i, tokens[i]]`` for log-softmax rows ``logp`` [k, V]; -inf for a token outside this model's vocabulary
    (a reward model with a smaller table than the base's: it cannot produce that token)."""
    vocab = logp.shape[-1]
    tokens = tokens.long()
    got = logp.gather(1, tokens.clamp(0, vocab - 1)[:, None]).squeeze(1)
    return torch.where(tokens < vocab, got, float("-inf"))


@dataclass
class PendingStep:
    """What one step's asking rows left for the sampler hook (device tensors, except ``rows`` and ``keys``)."""

    num_rows: int  # the step's logits rows: the sampler's output must have as many
    rows: np.ndarray  # [k] host row indices that asked
    index: torch.Tensor  # [k] the same on the device
    keys: list  # [k] their trace keys (alphas.py)
    alpha: torch.Tensor  # [k] fp32 a_t used
    asked: np.ndarray  # [k] host bool: the row asked for the models' log-probs too (taro_logprobs)
    lp_index: torch.Tensor | None  # [m] device row indices of those (None: no row asked)
    base: torch.Tensor | None  # [m, V_base] fp32 log-softmax of the base's logits
    reward: torch.Tensor | None  # [m, V_reward] fp32 log-softmax of the reward's own logits


class SampledLogprobs:
    """One model's hand-off from ``compute_logits`` to its sampler (module docstring)."""

    def __init__(self, recorder=None):
        self._recorder = recorder
        self.pending: PendingStep | None = None
        self.hooked = False  # a sampler reports here: stashing is worth it
        self._v1_search_failed = False

    @property
    def recorder(self):
        if self._recorder is None:
            from taro_vllm.serving.alphas import RECORDER

            self._recorder = RECORDER
        return self._recorder

    def stash(self, rows: np.ndarray, trace: list, alpha: torch.Tensor, z_base: torch.Tensor,
              z_reward: torch.Tensor, logprob_rows: np.ndarray | None = None) -> list:
        """Keep the traced ``rows``' a_t, and for those of them in ``logprob_rows`` both models' log-softmax, for the
        sampler hook; returns ``trace`` with those rows removed (their a_t is recorded after sampling, and only if
        they sampled). Without a hooked sampler nothing is kept and ``trace`` comes back unchanged: a_t are recorded
        now, as before, and log-probs stay null.
        """
        if not self.hooked:
            return trace
        device = z_base.device
        asked = np.zeros(len(rows), dtype=bool) if logprob_rows is None else np.isin(rows, logprob_rows)
        index = torch.from_numpy(rows).to(device, non_blocking=True)
        lp_rows = rows[asked]
        lp_index = torch.from_numpy(lp_rows).to(device, non_blocking=True) if lp_rows.size else None
        self.pending = PendingStep(
            num_rows=z_base.shape[0], rows=rows, index=index, keys=[trace[i] for i in rows.tolist()],
            alpha=alpha.index_select(0, index).float(), asked=asked, lp_index=lp_index,
            base=None if lp_index is None else torch.log_softmax(z_base.index_select(0, lp_index).float(), dim=-1),
            reward=None if lp_index is None else torch.log_softmax(z_reward.index_select(0, lp_index).float(),
                                                                   dim=-1))
        trace = list(trace)
        for i in rows.tolist():
            trace[i] = None
        return trace

    def complete(self, sampled_token_ids: torch.Tensor, sampled: np.ndarray | torch.Tensor | None = None) -> None:
        """The sampler's output of the step: ``sampled_token_ids`` [N, 1] and which rows really sampled (host bool
        array or device bool tensor [N]; None = all). Records the a_t (and the log-probs, where asked) of the
        stashed rows that sampled; one host-device sync, only in traced steps (as recording at once had)."""
        p, self.pending = self.pending, None
        if p is None:
            return
        if sampled_token_ids.dim() != 2 or sampled_token_ids.shape[0] != p.num_rows or \
                sampled_token_ids.shape[1] != 1:
            # Not this step's sampling call (a dummy run), or a sampler of several tokens per row (speculative
            # decoding, refused at start-up): nothing trustworthy to record.
            logger.error("TARo: sampler output of shape %s does not match the %d logits rows of the traced step; "
                         "its a_t are not recorded", tuple(sampled_token_ids.shape), p.num_rows)
            return
        k = len(p.keys)
        cols = [p.alpha]
        if isinstance(sampled, torch.Tensor):
            cols.append(sampled.reshape(-1).index_select(0, p.index).float())
        if p.lp_index is not None:
            tokens = sampled_token_ids[:, 0].index_select(0, p.lp_index)
            cols += [logprobs_at(p.base, tokens), logprobs_at(p.reward, tokens)]
        host = torch.cat(cols).tolist()  # the one sync
        alphas = host[:k]
        if sampled is None:
            keep = [True] * k
        elif isinstance(sampled, torch.Tensor):
            keep = [bool(x) for x in host[k:2 * k]]
        else:
            keep = np.asarray(sampled, dtype=bool)[p.rows].tolist()
        lp = iter(())
        if p.lp_index is not None:
            m = int(p.asked.sum())
            lp = iter(zip(host[-2 * m:-m], host[-m:]))
        keys, values, base, reward = [], [], [], []
        for j in range(k):
            b, r = next(lp) if p.asked[j] else (None, None)
            if keep[j]:
                keys.append(p.keys[j])
                values.append(alphas[j])
                base.append(b if p.asked[j] else _NOT_ASKED)
                reward.append(r if p.asked[j] else _NOT_ASKED)
        self.recorder.record_sampled(keys, values, base, reward)

    # --- wrapping the samplers -------------------------------------------------------------------------------

    def hook_v1_caller(self, frame) -> bool:
        """From inside ``compute_logits``: find the V1 runner up the stack (``frame`` = compute_logits' caller) and
        wrap its sampler. True when this model's sampler reports here (now or already)."""
        if self.hooked:
            return True
        if self._v1_search_failed:
            return False
        runner = _v1_runner(frame)
        if runner is None:
            self._v1_search_failed = True
            logger.error("TARo: the model runner's sampler could not be found (not vLLM's V1 runner, or its "
                         "internals moved): a_t are recorded before sampling (a prefill chunk then records one "
                         "too) and taro_logprobs responses carry null log-probs")
            return False
        hook_v1_runner(runner, self)
        return True


_HOOKED: dict[type, type] = {}


def _hooked_class(cls: type, method: str) -> type:
    """``cls`` with ``method`` calling the original, then the instance's ``_taro_after`` hook (if set)."""
    if cls in _HOOKED.values():
        return cls
    sub = _HOOKED.get(cls)
    if sub is None:
        def call(self, *args, **kwargs):
            out = getattr(super(sub, self), method)(*args, **kwargs)
            after = self.__dict__.get("_taro_after")
            if after is not None:
                try:
                    after(out)
                except Exception:  # noqa: BLE001 - a failed record must never take the engine down
                    logger.exception("TARo: recording the sampled tokens' log-probs failed")
            return out

        sub = _HOOKED[cls] = type(cls.__name__, (cls,), {method: call, "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__})
    return sub


def _hook(sampler: Any, method: str, after: Callable[[Any], None]) -> Any:
    sampler.__class__ = _hooked_class(type(sampler), method)
    sampler.__dict__["_taro_after"] = after
    return sampler


def hook_v2_sampler(sampler: Any, sampled: SampledLogprobs) -> Any:
    """Wrap a V2 runner's sampler (``vllm.v1.worker.gpu.sample.sampler.Sampler``: ``__call__(logits,
    input_batch)``); rows with ``num_sampled == 0`` (a prefill chunk) did not sample."""
    def after(out) -> None:
        if sampled.pending is not None:
            sampled.complete(out.sampled_token_ids, out.num_sampled > 0)

    _hook(sampler, "__call__", after)
    sampled.hooked = True
    return sampler


def hook_v1_runner(runner: Any, sampled: SampledLogprobs) -> None:
    """Wrap a V1 runner's sampler (``vllm.v1.sample.sampler.Sampler``, an ``nn.Module``: ``forward``); rows in the
    runner's ``discard_request_mask`` (a prefill chunk) did not sample."""
    def after(out) -> None:
        if sampled.pending is not None:
            n = out.sampled_token_ids.shape[0]
            sampled.complete(out.sampled_token_ids, ~np.asarray(runner.discard_request_mask.np[:n], dtype=bool))

    _hook(runner.sampler, "forward", after)
    sampled.hooked = True


def _v1_runner(frame) -> Any | None:
    """The V1 model runner among ``frame`` and its callers (compute_logits is called by ``execute_model``)."""
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if all(hasattr(owner, a) for a in ("sampler", "discard_request_mask", "input_batch")) and \
                isinstance(getattr(owner, "sampler", None), torch.nn.Module):
            return owner
        frame = frame.f_back
    return None
