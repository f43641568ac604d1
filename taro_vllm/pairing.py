"""Resolve and validate a TARo setup (base model + router checkpoint + reward model) once, into a typed TaroSetup.

``validate_setup`` reads every config, the router's weights and both tokenizers once and returns them; the vLLM model
keeps the result. Called by ``taro-vllm serve`` / ``taro_llm`` (fail fast, before vLLM spends a minute starting) and
by the model (so ``vllm serve --hf-overrides ...`` gets the same refusals): within one process the second call
returns the first one's result while none of the files changed (the cache is keyed by every file's size and mtime).
Every refusal names the file and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from taro_vllm.checkpoint import (CheckpointError, RouterCheckpointConfig, load_router, read_config,
                                  tokenizer_fingerprint)
from taro_vllm.model_files import ModelFileError, check_model_folder


class TaroSetupError(ValueError):
    """A base / reward / router combination that cannot be served."""


@dataclass(frozen=True, eq=False)
class TaroSetup:
    base_path: str
    reward_path: str
    router_path: str
    vocab_size: int  # the served (base) vocabulary; the mix is over these columns
    tokenizer_fingerprint: str | None
    router_config: RouterCheckpointConfig = field(repr=False)
    router_state: dict[str, torch.Tensor] = field(repr=False)  # validated weights, on the host, as stored
    base_config: dict = field(repr=False)  # config.json of each model
    reward_config: dict = field(repr=False)


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


def resolve_reward_path(router_path: str | Path, reward_model: str | None,
                        cfg: RouterCheckpointConfig | None = None) -> str:
    """The reward model to serve: the explicit override, else the one the router checkpoint names.

    A relative path in the checkpoint is read relative to the checkpoint folder (so a checkpoint and its reward
    model can be moved together).
    """
    if reward_model:
        return str(Path(reward_model).expanduser())
    cfg = cfg if cfg is not None else read_config(router_path)
    if not cfg.reward_model:
        raise TaroSetupError(
            f"{Path(router_path) / 'config.json'} names no reward_model; pass --taro-reward-model PATH"
        )
    p = Path(cfg.reward_model).expanduser()
    if not p.is_absolute() and (Path(router_path) / p).exists():
        p = Path(router_path) / p
    return str(p)


_RESOLVED: dict[tuple, tuple[tuple, TaroSetup]] = {}


def _signature(*folders: Path) -> tuple:
    """Name, size and mtime of every file in the folders: a changed, added or removed file changes it."""
    sig = []
    for folder in folders:
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                st = f.stat()
                sig.append((str(f), st.st_size, st.st_mtime_ns))
        else:
            sig.append((str(folder), None, None))
    return tuple(sig)


def validate_setup(base_path: str | Path, router_path: str | Path, reward_model: str | None = None) -> TaroSetup:
    """Check that base, reward and router index the same tokens and that all three load; return the setup.

    Resolved once per process for unchanged files (a refusal is never cached: the next call checks again)."""
    base, router = Path(base_path).expanduser(), Path(router_path).expanduser()
    key = (str(base), str(router), reward_model)
    cached = _RESOLVED.get(key)
    if cached is not None and cached[0] == _signature(base, router, Path(cached[1].reward_path)):
        return cached[1]
    setup = _resolve(base, router, reward_model)
    entry = (_signature(base, router, Path(setup.reward_path)), setup)
    # Also under the resolved reward path: the engine's model asks with the path taro_llm / taro-vllm serve resolved.
    _RESOLVED[key] = _RESOLVED[(str(base), str(router), setup.reward_path)] = entry
    return setup


def _resolve(base: Path, router_path: Path, reward_model: str | None) -> TaroSetup:
    try:
        router_cfg = read_config(router_path)
        reward = Path(resolve_reward_path(router_path, reward_model, router_cfg))
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
        router, _ = load_router(router_path, expected_vocab_size=vb, expected_tokenizer_fingerprint=fp_base,
                                config=router_cfg)
    except CheckpointError as e:
        raise TaroSetupError(str(e)) from None
    return TaroSetup(str(base), str(reward), str(router_path), vb, fp_base, router_config=router_cfg,
                     router_state={k: v.detach() for k, v in router.state_dict().items()},
                     base_config=base_cfg, reward_config=reward_cfg)


def _same_model(a: Path, b: Path) -> bool:
    """One model in two places: the same folder, or copies (equal config.json, weight files of equal names and
    sizes)."""
    if a.resolve() == b.resolve():
        return True

    def files(p: Path) -> dict:
        return {f.name: f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json")}

    try:
        return (json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
                and files(a) == files(b))
    except (OSError, ValueError):
        return False


def validate_extra_router(setup: TaroSetup, router_path: str | Path) -> TaroSetup:
    """Check another router for an engine already set up (``setup``): the same checks as the first router against
    the engine's base and reward model, and the reward model it names (if any) must be the engine's."""
    router_path = Path(router_path).expanduser()
    try:
        named = read_config(router_path).reward_model
    except CheckpointError as e:
        raise TaroSetupError(str(e)) from None
    if named:
        named_path = Path(resolve_reward_path(router_path, None))
        if named_path.exists() and not _same_model(named_path, Path(setup.reward_path)):
            raise TaroSetupError(
                f"{router_path / 'config.json'}: this router was trained with the reward model {named_path}, but the "
                f"engine serves {setup.reward_path}; all routers of one engine share its reward model")
    return validate_setup(setup.base_path, router_path, setup.reward_path)
