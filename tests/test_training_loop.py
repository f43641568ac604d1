"""One training loop (router_training.loop.run) for every trainer: a trainer gives the loss of step N and its
evaluation, the loop does resume, the LR schedule, stop_after, the NaN guard, logs, evaluation and checkpoints.

First the loop on a toy regression (what a trainer has to provide), then both real trainers through it."""

from __future__ import annotations

import json

import pytest
import torch

from router_training import loop
from router_training.checkpointing import has_state
from router_training.errors import TrainingSetupError
from router_training.loop import LoopConfig
from router_training.reward_trainer import train_reward
from router_training.router_trainer import RouterTrainConfig, router_spec, train_router
from test_training_reward import cue_pairs, small
from test_training_router import synthetic_inputs

TRUE_W = torch.tensor([[1.0, -2.0, 0.5]])


def toy_trainer(run_dir, **loop_kw):
    """A linear model fitted to y = TRUE_W x: step N's batch is a function of N (resumable), like the trainers'."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    extra = {"first_eval": None}  # a value the run measures once and must keep across a kill
    finished_with_state = []

    def step_fn(step):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        loss = ((model(x) - x @ TRUE_W.T) ** 2).mean()
        return loss, {"w0": float(model.weight[0, 0].detach())}

    def eval_fn(step):
        err = float((model.weight.detach() - TRUE_W).abs().sum())
        extra["first_eval"] = extra["first_eval"] if extra["first_eval"] is not None else err
        return {"weight_error": err, "detail": {"step": step}}  # the nested dict is returned, not logged

    def finish(res):
        finished_with_state.append(has_state(run_dir))  # the artefact is saved while the state still exists

    cfg = LoopConfig(**{"lr": 0.05, "warmup": 3, "max_steps": 10, "eval_every": 5, "checkpoint_every": 3,
                        "progress": False, **loop_kw})
    res = loop.run(model, step_fn, eval_fn, cfg, run_dir, {"toy": 1}, name="toy", finish=finish, extra=extra)
    return model, res, extra, finished_with_state


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_the_loop_trains_logs_evaluates_and_resumes_a_killed_run_exactly(tmp_path):
    whole, res, extra, finished_with_state = toy_trainer(tmp_path / "whole")
    assert res.finished and res.steps == 10 and res.eval["weight_error"] < extra["first_eval"]
    assert res.eval["detail"] == {"step": 10}
    assert finished_with_state == [True] and not has_state(tmp_path / "whole")  # dropped only after finish
    log = rows(tmp_path / "whole")
    assert [r["step"] for r in log if r["split"] == "eval"] == [0, 5, 10]
    assert all("detail" not in r for r in log)
    train = [r for r in log if r["split"] == "train"]
    assert [r["lr"] for r in train[:4]] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05, 0.05])  # warmup, then constant
    assert {"loss", "w0", "grad_norm"} <= set(train[0])

    killed, res, _, finished_with_state = toy_trainer(tmp_path / "killed", stop_after=5)
    assert not res.finished and res.steps == 5 and finished_with_state == []  # state on disk: step 3
    resumed, res, resumed_extra, _ = toy_trainer(tmp_path / "killed", resume=True)
    assert res.finished and res.steps == 10
    assert torch.equal(resumed.weight, whole.weight)
    assert resumed_extra == extra, "extra comes back from the state, it is not re-measured"
    log = rows(tmp_path / "killed")
    assert [r["step"] for r in log if r["split"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in log if r["split"] == "eval"] == [0, 5, 10]


def test_keep_state_keeps_the_last_checkpoint(tmp_path):
    toy_trainer(tmp_path, keep_state=True)
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 9


def test_a_non_finite_loss_stops_the_run_with_the_fix(tmp_path):
    model = torch.nn.Linear(2, 1)

    def step_fn(step):
        loss = model(torch.ones(1, 2)).sum() ** 2
        return (loss * float("nan") if step == 2 else loss), {}

    with pytest.raises(TrainingSetupError, match=r"^toy loss became nan at step 3; lower --lr$"):
        loop.run(model, step_fn, lambda step: {}, LoopConfig(progress=False), tmp_path, {}, name="toy")
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from router_training.data import save_records

    return save_records(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", cue_pairs(16))


def test_both_trainers_run_the_one_loop(tmp_path, monkeypatch, tiny_paths, pairs_file):
    calls = []
    real_run = loop.run

    def spy(model, step_fn, eval_fn, cfg, run_dir, run_cfg, **kw):
        calls.append((kw["name"], cfg, run_cfg))
        return real_run(model, step_fn, eval_fn, cfg, run_dir, run_cfg, **kw)

    monkeypatch.setattr(loop, "run", spy)
    router_cfg = RouterTrainConfig(out=str(tmp_path / "router"), router=router_spec(k=4, embed_dim=4, hidden_dim=8),
                                   loop=LoopConfig(max_steps=4, checkpoint_every=1, stop_after=2, progress=False))
    reward_cfg = small(tiny_paths, pairs_file, tmp_path / "reward", heldout_fraction=0.25,
                       loop=dict(max_steps=4, checkpoint_every=1, stop_after=2))
    router_res = train_router(router_cfg, synthetic_inputs())
    reward_res = train_reward(reward_cfg)

    assert [(name, cfg) for name, cfg, _ in calls] == [("router", router_cfg.loop), ("reward", reward_cfg.loop)]
    # The same stop_after, checkpoint cadence and log schema for both.
    for res, out in ((router_res, tmp_path / "router"), (reward_res, tmp_path / "reward")):
        assert not res.finished and res.steps == 2
        assert json.loads((out / "train" / "state" / "state.json").read_text())["step"] == 2
        train = [r for r in rows(out / "train") if r["split"] == "train"]
        assert [r["step"] for r in train] == [1, 2] and all({"loss", "lr", "grad_norm"} <= set(r) for r in train)
    # What a resume must match is flat, one key per setting (loop, router and trainer fields alike).
    router_run_cfg, reward_run_cfg = calls[0][2], calls[1][2]
    assert router_run_cfg["k"] == 4 and router_run_cfg["vocab_size"] == synthetic_inputs().vocab_size
    assert router_run_cfg["max_steps"] == reward_run_cfg["max_steps"] == 4 and reward_run_cfg["lr"] == 1e-3
