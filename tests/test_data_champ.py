"""champ-dataset: real (correct step, first wrong step) pairs from the annotated model solutions."""

from __future__ import annotations

import json

import pytest

from router_training import champ
from router_training.errors import DataError


@pytest.fixture(scope="module")
def pairs():
    return champ.build_pairs()


def test_every_annotated_wrong_step_becomes_a_pair(pairs):
    data = champ.load_champ()
    annotated = sum(a.get("start_idx") is not None for p in data["problems"].values()
                    for a in p["fws_annotations"].values())
    assert 400 <= len(pairs) <= annotated  # a few over-long "steps" are skipped
    assert len({p.id for p in pairs}) == len(pairs)


def test_pair_fields_come_from_the_annotation(pairs):
    data = champ.load_champ()
    for p in pairs[:50]:
        pid, key = p.group.removeprefix("champ:"), p.id.removeprefix(f"champ-{p.group.removeprefix('champ:')}-")
        ann = data["problems"][pid]["fws_annotations"][key]
        ref_steps = [s["_text"].strip() for s in data["problems"][pid]["solution"]["steps"]]
        assert p.rejected == ann["text"][ann["start_idx"]:ann["end_idx"]].strip()  # the first wrong step
        assert p.chosen in ref_steps  # a reference (correct) step
        assert ann["text"].startswith(p.initial_reason_steps.rstrip())  # the model's correct prefix
        assert p.prompt == data["problems"][pid]["_text"].strip()


def test_unreadable_champ_file_is_a_data_error(tmp_path):
    bad = tmp_path / "v0.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="not a readable champ JSON"):
        champ.load_champ(bad)
    bad.write_text(json.dumps({"hints": {}}))
    with pytest.raises(DataError, match="no 'problems'"):
        champ.load_champ(bad)
