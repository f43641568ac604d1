"""Resolve and validate a TARo setup (base model + router checkpoint + reward model) before any engine starts.

Used by ``taro-vllm serve`` (fail fast, before vLLM spends a minute starting) and again inside the vLLM model (so
``vllm serve --hf-overrides ...`` and the offline ``LLM`` API get the same refusals). Every refusal names the file
and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from taro_vllm.checkpoint import CheckpointError, load_router, read_config, tokenizer_fingerprint
from taro_vllm.model_files import ModelFileError, check_model_folder


class TaroSetupError(ValueError):
    """A base / reward / router combination that cannot be served."""


@dataclass(frozen=True)
class TaroSetup:
    base_path: str
    reward_path: str
    router_path: str
    vocab_size: int  # the served (base) vocabulary; the mix is over these columns
    tokenizer_fingerprint: str | None


def _config_json(path: Path, what: str) -> dict:
    cfg = path / "config.json"
    if not path.exists():
        raise TaroSetupError(f"{what} {path} does not exist")
    if not cfg.is_file():
        raise TaroSetupError(f"{what} {path} has no config.json; expected a Hugging Face model folder")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise TaroSetupError(f"{cfg} is not valid JSON ({e})") from None


def _fingerprint(path: Path) -> str | None:
    """Tokenizer fingerprint of a model folder, or None if it ships no tokenizer files."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return tokenizer_fingerprint(path)


def resolve_reward_path(router_path: str | Path, reward_model: str | None) -> str:
    """The reward model to serve: the explicit override, else the one the router checkpoint names.

    A relative path in the checkpoint is read relative to the checkpoint folder (so a checkpoint and its reward
    model can be moved together).
    """
    if reward_model:
        return str(Path(reward_model).expanduser())
    cfg = read_config(router_path)
    if not cfg.reward_model:
        raise TaroSetupError(
            f"{Path(router_path) / 'config.json'} names no reward_model; pass --taro-reward-model PATH"
        )
    p = Path(cfg.reward_model).expanduser()
    if not p.is_absolute() and (Path(router_path) / p).exists():
        p = Path(router_path) / p
    return str(p)


def validate_setup(base_path: str | Path, router_path: str | Path, reward_model: str | None = None) -> TaroSetup:
    """Check that base, reward and router index the same tokens and that all three load; return the setup."""
    base = Path(base_path).expanduser()
    try:
        router_cfg = read_config(router_path)
        reward = Path(resolve_reward_path(router_path, reward_model))
    except CheckpointError as e:
        raise TaroSetupError(str(e)) from None
    if not reward.exists():
        raise TaroSetupError(
            f"reward model {reward} (named by {Path(router_path) / 'config.json'}) does not exist; "
            "pass --taro-reward-model PATH"
        )
    base_cfg = _config_json(base, "base model")
    reward_cfg = _config_json(reward, "reward model")
    try:  # config fields and weight files (headers only): a truncated or pickled file is refused here, in ms
        check_model_folder(base, base_cfg, "base model")
        check_model_folder(reward, reward_cfg, "reward model")
    except ModelFileError as e:
        raise TaroSetupError(str(e)) from None
    vb, vr = base_cfg.get("vocab_size"), reward_cfg.get("vocab_size")
    if vb is None or vr is None:
        raise TaroSetupError(f"vocab_size missing from {base / 'config.json'} or {reward / 'config.json'}")
    fp_base, fp_reward = _fingerprint(base), _fingerprint(reward)
    if fp_base and fp_reward and fp_base != fp_reward:
        raise TaroSetupError(
            f"tokenizers differ: {base} and {reward} do not index the same tokens, so their logits cannot be mixed "
            "column by column. Use a reward model trained from the base's tokenizer."
        )
    if fp_base is None or fp_reward is None:
        # Without tokenizer files, the vocab width is the only evidence; padding may differ by a few rows.
        if abs(vb - vr) > 1024:
            raise TaroSetupError(
                f"vocab sizes differ: base {base} has {vb}, reward {reward} has {vr}; they are not one tokenizer"
            )
    if router_cfg.router.vocab_size not in (vb,):
        raise TaroSetupError(
            f"{Path(router_path) / 'config.json'}: router vocab_size {router_cfg.router.vocab_size} != base "
            f"vocab_size {vb} ({base}); this router was trained for another tokenizer"
        )
    if fp_base and router_cfg.tokenizer_fingerprint and router_cfg.tokenizer_fingerprint != fp_base:
        raise TaroSetupError(
            f"{Path(router_path) / 'config.json'}: the router was trained with a different tokenizer than {base}'s "
            f"(fingerprint {router_cfg.tokenizer_fingerprint[:19]}... vs {fp_base[:19]}...)"
        )
    try:  # the weights too: a pickle, truncation, NaN or wrong shapes are refused here, before any engine starts
        load_router(router_path, expected_vocab_size=vb, expected_tokenizer_fingerprint=fp_base)
    except CheckpointError as e:
        raise TaroSetupError(str(e)) from None
    return TaroSetup(str(base), str(reward), str(router_path), vb, fp_base)
