"""Resumable training state survives a kill at ANY point of a save (or of the final clean-up).

Each file operation of ``save_state``/``clear_state`` (mkdir, each file write, each rename, each recursive delete)
is a kill point. A kill is simulated deterministically: the N-th operation is half done (a write leaves a truncated
file, a recursive delete removes one file) and then raises ``Killed``, so nothing after it runs, as with SIGKILL.
After every kill the run must resume from a complete state (the previous one or the new one, weights matching its
step) and the next save must succeed. The real SIGKILL version is in test_training_faults.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from router_training import checkpointing
from router_training.checkpointing import clear_state, has_state, load_state, save_state

CONFIG = {"lr": 1e-3, "seed": 0}


class Killed(BaseException):
    """The process died here (BaseException: no ``except Exception`` in the code under test may swallow it)."""


class KillSwitch:
    """Counts file operations; the ``kill_at``-th one is half done, then the process "dies"."""

    def __init__(self, monkeypatch):
        self.kill_at: int | None = None
        self.count = 0
        real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, checkpointing.save_file
        real_write, real_mkdir = Path.write_text, Path.mkdir

        def op(half_done=None):
            self.count += 1
            if self.kill_at is not None and self.count == self.kill_at:
                if half_done is not None:
                    half_done()
                raise Killed(self.count)

        def replace(src, dst):
            op()  # a rename is atomic: either done or not
            real_replace(src, dst)

        def rmtree(path, *a, **k):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            op(lambda: files and files[0].unlink())  # killed mid-delete: one file gone, state.json still there
            real_rmtree(path, *a, **k)

        def save_file(tensors, filename, *a, **k):
            def half():
                real_save(tensors, filename, *a, **k)
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
            op(half)
            real_save(tensors, filename, *a, **k)

        def write_text(path, text, *a, **k):
            op(lambda: real_write(path, text[: len(text) // 2], *a, **k))
            return real_write(path, text, *a, **k)

        def mkdir(path, *a, **k):
            op()
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        monkeypatch.setattr(checkpointing, "save_file", save_file)
        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(Path, "mkdir", mkdir)

    def run(self, fn, *args, kill_at: int | None) -> bool:
        """Run fn with a kill at operation ``kill_at``; True if it was killed."""
        self.kill_at, self.count = kill_at, 0
        try:
            fn(*args)
            return False
        except Killed:
            return True
        finally:
            self.kill_at = None


@pytest.fixture
def kills(monkeypatch):
    return KillSwitch(monkeypatch)


def new_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()  # so the optimizer has tensors to save
    return model, opt


def save_at(run: Path, step: int) -> None:
    """A save of the state "after `step` steps": every weight equals `step`, so a loaded state proves its step."""
    model, opt = new_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    save_state(run, model, opt, step, CONFIG)


def resumed_step(run: Path) -> int | None:
    """What a `--resume` would continue from (None: start over); the weights must belong to that step."""
    if not has_state(run):
        return None
    model, opt = new_model()
    step = load_state(run, model, opt, CONFIG)["step"]
    for p in model.parameters():
        assert bool((p == step).all()), f"state.json says step {step} but the weights are from another save"
    return step


def test_a_kill_at_any_point_of_a_save_resumes_and_the_next_save_succeeds(tmp_path, kills):
    killed_at = []
    k = 0
    while True:
        k += 1
        run = tmp_path / f"kill{k}"
        save_at(run, 5)
        if not kills.run(save_at, run, 10, kill_at=k):
            break
        killed_at.append(k)
        assert resumed_step(run) in (5, 10), f"kill point {k}"
        save_at(run, 15)  # the resumed run's next checkpoint (this is what crashed in issue 16)
        assert resumed_step(run) == 15
        assert sorted(p.name for p in run.iterdir()) == ["state"], f"leftovers after kill point {k}"
    # mkdir, 3 writes, 2 renames, 1 delete at least: every one of them was a kill point
    assert len(killed_at) >= 7


def test_two_kills_in_a_row_at_every_pair_of_points(tmp_path, kills):
    """A save killed, the resumed run's save killed too (its start meets the first one's leftovers), then a save."""
    pairs = 0
    k1 = 0
    while True:
        k1 += 1
        probe = tmp_path / f"probe{k1}"
        save_at(probe, 5)
        if not kills.run(save_at, probe, 10, kill_at=k1):
            break
        k2 = 0
        while True:
            k2 += 1
            run = tmp_path / f"kill{k1}-{k2}"
            save_at(run, 5)
            assert kills.run(save_at, run, 10, kill_at=k1)
            if not kills.run(save_at, run, 15, kill_at=k2):
                break
            pairs += 1
            assert resumed_step(run) in (5, 10, 15), f"kill points {k1}, {k2}"
            save_at(run, 20)
            assert resumed_step(run) == 20, f"kill points {k1}, {k2}"
            shutil.rmtree(run)
        shutil.rmtree(probe)
    assert pairs >= 49


def test_stale_leftovers_at_entry_are_tidied(tmp_path):
    run = tmp_path / "run"
    save_at(run, 5)
    (run / "state.old").mkdir()
    (run / "state.old" / "state.json").write_text("{}")  # half-deleted: state.json left, weights gone
    (run / "state.tmp").mkdir()
    (run / "state.tmp" / "weights.safetensors").write_bytes(b"\x00" * 7)  # half-written
    assert resumed_step(run) == 5  # state/ wins over both
    save_at(run, 10)
    assert resumed_step(run) == 10
    assert sorted(p.name for p in run.iterdir()) == ["state"]


def test_a_kill_during_clear_state_never_leaves_a_broken_state(tmp_path, kills):
    k = 0
    while True:
        k += 1
        run = tmp_path / f"kill{k}"
        save_at(run, 5)
        kills.run(save_at, run, 10, kill_at=3)  # with the leftovers of a killed save, too
        if not kills.run(clear_state, run, kill_at=k):
            assert not has_state(run)
            break
        assert resumed_step(run) in (None, 5, 10), f"kill point {k}"
        clear_state(run)
        assert not has_state(run) and list(run.iterdir()) == []
