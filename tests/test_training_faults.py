"""Trainer faults, for real: a training process killed with SIGKILL (at a chosen point of a checkpoint save, see
test_checkpointing.py for every point) resumes from its last checkpoint and ends with the same weights as an
uninterrupted run; a corrupt resumable state is refused with a clear error, never loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from router_training.__main__ import main
from router_training.checkpointing import has_state
from router_training.data import save_records
from router_training.reward_trainer import trained_weights
from test_training_reward import cue_pairs

STEPS = 30


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return save_records(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", cue_pairs(40))


def reward_cli(tiny_paths, pairs_file, out: Path, *extra: str) -> list[str]:
    return ["reward", "--model", str(tiny_paths["tiny-llama-reward"]), "--data", str(pairs_file), "--out", str(out),
            "--max-steps", str(STEPS), "--checkpoint-every", "5", "--eval-every", str(STEPS), "--batch-size", "4",
            "--max-len", "32", "--lr", "1e-3", "--heldout-fraction", "0.1", "--no-chat-template", "--no-progress",
            "--seed", "0", *extra]


def saved_step(out: Path) -> int | None:
    f = out / "train" / "state" / "state.json"
    try:
        return json.loads(f.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


# The training process, paused at an exact point of its second checkpoint save (step 10) so the parent can SIGKILL it
# there whatever the machine's speed: it touches the marker file, then sleeps until killed. One real kill point (the
# one that crashed the resume of issue 16); test_checkpointing.py injects the crash deterministically between every
# pair of file operations of a save, in process.
PAUSING_TRAINER = r"""
import shutil, sys, time
from pathlib import Path

marker = Path(sys.argv[1])
real_rmtree = shutil.rmtree


def rmtree(path, *args, **kwargs):  # pause with state/ the new state and state.old/ half deleted
    if Path(path).name == "state.old":
        sorted(Path(path).iterdir())[0].unlink()
        marker.touch()
        time.sleep(600)
    return real_rmtree(path, *args, **kwargs)


shutil.rmtree = rmtree

from router_training.__main__ import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tiny_paths, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(reward_cli(tiny_paths, pairs_file, out)) == 0
    return trained_weights(out)


def test_sigkilled_training_resumes_to_the_same_weights(tmp_path, tiny_paths, pairs_file, uninterrupted):
    killed, marker = tmp_path / "killed", tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_TRAINER, str(marker),
                             *reward_cli(tiny_paths, pairs_file, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.monotonic() + 600  # only so a broken trainer cannot hang the suite; the kill waits for the marker
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists() and proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.poll() else "hung"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    assert has_state(killed / "train") and saved_step(killed) == 10  # what --resume continues from: the new state

    assert main(reward_cli(tiny_paths, pairs_file, killed, "--resume")) == 0  # and saves at 15, 20, 25
    rows = [json.loads(line) for line in (killed / "train" / "metrics.jsonl").open()]
    assert max(r["step"] for r in rows) == STEPS
    b = trained_weights(killed)
    assert uninterrupted.keys() == b.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], b[name]), name


@pytest.mark.parametrize("damage, file, message", [
    ("truncate", "weights.safetensors", "weights.safetensors is missing or corrupt"),
    ("truncate", "optimizer.safetensors", "optimizer.safetensors is missing or corrupt"),
    ("garble", "state.json", "state.json is corrupt"),
    ("nan", "weights.safetensors", "holds NaN/inf"),
])
def test_corrupt_training_state_is_refused(tmp_path, tiny_paths, pairs_file, capsys, damage, file, message):
    out = tmp_path / "run"
    args = reward_cli(tiny_paths, pairs_file, out, "--stop-after", "5")
    assert main(args) == 0 and saved_step(out) == 5
    path = out / "train" / "state" / file
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        path.write_text('{"step": 5, "optim')
    else:
        from safetensors.torch import load_file, save_file

        w = load_file(str(path))
        first = next(iter(w))
        w[first] = torch.full_like(w[first], float("nan"))
        save_file(w, str(path))
    state = path.parent
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    capsys.readouterr()
    rc = main(reward_cli(tiny_paths, pairs_file, out, "--resume"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after transformers' weight-loading progress bar
    assert rc == 2 and last.startswith("error: ") and message in last and "Traceback" not in err, err
    # Nothing the user had is touched by the refusal.
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
