"""The trainers' command lines are built from their config dataclasses (router_training.configs): every default lives
on its field, nested configs (the shared LoopConfig, the router's RouterConfig) are filled from the same flat flags,
and every flag spelling the recipes and READMEs use still parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from router_training import configs
from router_training.__main__ import _parser, main
from router_training.encoding import ExampleConfig
from router_training.loop import LoopConfig
from router_training.reward_trainer import RewardTrainConfig, reward_loop
from router_training.router_fit import FitConfig, fit_loop, fit_router_spec
from router_training.router_trainer import RouterTrainConfig, router_spec

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {"reward": RewardTrainConfig, "router": RouterTrainConfig, "fit-router": FitConfig}


def parsed(cmd: str):
    argv = shlex.split(cmd)
    return configs.build(CLASSES[argv[0]], vars(_parser().parse_args(argv)))


def test_defaults_come_from_the_dataclasses():
    assert parsed("reward --model M --data d --out O") == RewardTrainConfig(model="M", data=["d"], out="O")
    assert parsed("router --base B --reward R --data d --out O") == RouterTrainConfig(base="B", reward="R",
                                                                                      data=["d"], out="O")
    assert parsed("fit-router --cache C --out O") == FitConfig(cache="C", out="O")
    # Each trainer's own loop defaults: the reward model (a pretrained LM) takes smaller steps.
    assert RewardTrainConfig(model="M", data=[], out="O").loop == reward_loop() != LoopConfig()


def test_flat_flags_fill_the_nested_configs():
    cfg = parsed("reward --model M --data a --data b --out O --lora --lora-last-layers 6 --lr 5e-4 --max-eval 16 "
                 "--no-chat-template --no-progress --resume --stop-after 3")
    assert cfg == RewardTrainConfig(model="M", data=["a", "b"], out="O", lora=True, lora_last_layers=6,
                                    max_eval_pairs=16, examples=ExampleConfig(chat_template=False),
                                    loop=reward_loop(lr=5e-4, progress=False, resume=True, stop_after=3))
    cfg = parsed("router --base B --reward R --data d --out O --kind full --embed-dim 4 --max-eval 8 --warmup 2")
    assert cfg.router == router_spec(kind="full", embed_dim=4) and cfg.max_eval_examples == 8
    assert cfg.loop == LoopConfig(warmup=2)
    # fit-router's older spellings (--steps, --batch-rows) fill its nested loop; its router keeps its own defaults.
    cfg = parsed("fit-router --cache C --out O --steps 20 --batch-rows 64 --embed-dim 4 --init-bias 0 --no-progress")
    assert cfg.loop == fit_loop(max_steps=20, batch_size=64, progress=False)
    assert cfg.router == fit_router_spec(embed_dim=4, init_bias=0.0) and cfg.router.hidden_dim == 64
    assert fit_loop() == LoopConfig(lr=1e-3, warmup=0, weight_decay=1e-4, batch_size=512, max_steps=1000,
                                    eval_every=250, checkpoint_every=0)


def test_a_bad_router_setting_is_a_one_line_error(capsys):
    assert main(["router", "--base", "B", "--reward", "R", "--data", "d", "--out", "O", "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid RouterConfig") and "Traceback" not in err


def documented_commands():
    """(subcommand, flags) of every `router_training reward|router|fit-router` line of the recipes and READMEs,
    with the shell variables that hold flags (`common=(...)`, `ROUTER_FLAGS=${ROUTER_FLAGS:-...}`) expanded."""
    files = sorted((ROOT / "router_training" / "recipes").glob("*.sh")) + [
        ROOT / "README.md", ROOT / "router_training" / "recipes" / "README.md"]
    for path in files:
        text = path.read_text().replace("\\\n", " ")
        for m in re.finditer(r"router_training (reward|router|fit-router) ([^\n]*)", text):
            seg = m.group(2)
            for var in re.findall(r"\$\{?(\w+)", seg):
                held = re.search(rf"\b{var}=\(([^)]*)\)", text) or re.search(rf"\b{var}=\$\{{{var}:-([^}}]*)\}}", text)
                seg += " " + (held.group(1) if held else "")
            yield path.name, m.group(1), set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", seg))


def test_every_documented_flag_still_parses(capsys):
    commands = list(documented_commands())
    assert {cmd for _, cmd, _ in commands} == set(CLASSES)
    for name, cmd, flags in commands:
        with pytest.raises(SystemExit):
            _parser().parse_args([cmd, "--help"])
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out))
        assert flags <= options, f"{name}: {cmd} no longer takes {sorted(flags - options)}"
