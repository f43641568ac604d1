"""GSM-symbolic Step-DPO pairs: steps, corruptions, and the evaluation split kept out of every training set."""

from __future__ import annotations

import random

import pytest

from router_training import gsm

# Four templates that generate variants in well under a second (see gsm.SLOW_TEMPLATE_IDS for the others).
FAST_TRAINING_IDS = [103, 145, 269, 491]


@pytest.fixture(scope="module")
def templates():
    return gsm.load_templates("eng")


@pytest.fixture(scope="module")
def variants(templates):
    return gsm.generate_variants(templates, FAST_TRAINING_IDS, n_per_template=3, seed=0)


def test_steps_drop_calculator_annotations_and_end_with_the_answer():
    answer = "He buys 3*4 = <<3*4=12>>12 eggs.\nHe eats 2, so 12-2 = <<12-2=10>>10 are left.\n#### 10"
    assert gsm.solution_steps(answer) == ["He buys 3*4 = 12 eggs.", "He eats 2, so 12-2 = 10 are left.",
                                          "The answer is 10."]


@pytest.mark.parametrize("kind, expected", [
    ("wrong_arithmetic", None),  # some wrong result, checked below
    ("wrong_operand", None),
    ("skipped_quantity", "Total: 2 + 3 = 5 pens."),
])
def test_each_corruption_gives_a_different_wrong_step(kind, expected):
    raw = "Total: 2 + 3 + 4 = <<2+3+4=9>>9 pens."
    bad = gsm.corrupt_step(raw, kind, random.Random(0))
    assert bad is not None and bad != gsm.clean_step(raw) and "<<" not in bad
    if expected:
        assert bad == expected
    if kind == "wrong_operand":  # one operand changed and the result recomputed from it: consistent but wrong
        lhs, rhs = bad.removeprefix("Total: ").removesuffix(" pens.").split(" = ")
        assert eval(lhs) == float(rhs) and float(rhs) != 9


def test_pairs_share_the_prefix_and_differ_in_the_step(variants):
    pairs = gsm.build_pairs(variants, seed=0)
    # at least one pair per step and one on the final answer of every variant
    assert {p.id.split("-s")[0] for p in pairs if p.chosen.startswith("The answer is")} == {
        gsm.variant_id(v) for v in variants}
    assert len(pairs) >= 3 * len(variants)
    for p in pairs:
        assert p.chosen != p.rejected
        assert p.full_chosen.startswith(p.initial_reason_steps)
        assert p.full_rejected == p.initial_reason_steps + p.rejected
        assert p.group.startswith("gsm:") and p.dataset == "gsm_symbolic"
    assert {p.id.rsplit("-", 1)[1] for p in pairs} == set(gsm.CORRUPTIONS)
    assert gsm.build_pairs(variants, seed=0) == pairs, "deterministic for a seed"


def test_eval_templates_and_original_questions_never_reach_training(templates, variants):
    assert len(gsm.EVAL_TEMPLATE_IDS) == 20 and set(gsm.EVAL_TEMPLATE_IDS) <= {t.id_orig for t in templates}
    train_ids = gsm.training_template_ids(templates, include_slow=True)
    assert not set(train_ids) & set(gsm.EVAL_TEMPLATE_IDS) and len(train_ids) == 80

    originals = {t.question.strip() for t in templates}
    eval_groups = {gsm.template_group(i) for i in gsm.EVAL_TEMPLATE_IDS}
    eval_ids = {e.id for e in gsm.eval_items(templates)}
    assert eval_ids == {gsm.original_item_id(i) for i in gsm.EVAL_TEMPLATE_IDS}
    for records in (gsm.build_pairs(variants), gsm.build_solutions(variants)):
        assert records
        assert not {r.prompt for r in records} & originals
        assert not {r.group for r in records} & eval_groups
        assert not {r.id for r in records} & eval_ids
        assert all(r.id.startswith("gsm-") for r in records)  # variant ids, never "gsm8k-test-N"

    with pytest.raises(ValueError, match="evaluation templates"):
        gsm.generate_variants(templates, [gsm.EVAL_TEMPLATE_IDS[0]], n_per_template=1)


def test_variants_are_new_questions_with_exact_answers(templates, variants):
    by_id = {t.id_orig: t for t in templates}
    for v in variants:
        assert v.question != by_id[v.template_id].question
        steps, final = gsm.split_answer(v.answer)
        assert steps and final.lstrip("-").replace(".", "").isdigit()


def test_data_cli_writes_training_files_and_the_eval_split(tmp_path, capsys):
    import json

    from router_training.__main__ import main
    from router_training.data import load_solutions, load_step_pairs

    out = tmp_path / "data"
    assert main(["data", "--out", str(out), "--variants", "2", "--max-templates", "2", "--no-champ"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eval_template_ids"] == list(gsm.EVAL_TEMPLATE_IDS)
    assert not set(manifest["training_template_ids"]) & set(gsm.EVAL_TEMPLATE_IDS)
    pairs, sols = load_step_pairs(out / "pairs_gsm.jsonl"), load_solutions(out / "solutions_gsm.jsonl")
    assert pairs and len(sols) == 4
    evals = load_solutions(out / "eval_gsm.jsonl")
    assert {e.id for e in evals} == {gsm.original_item_id(i) for i in gsm.EVAL_TEMPLATE_IDS}
    assert not {e.prompt for e in evals} & {r.prompt for r in [*pairs, *sols]}
