"""TAWP: the generator, the one prompt, the line checker on known chains, and on-policy pair construction."""

from router_training import onpolicy, tawp
from router_training.data import StepPair, load_step_pairs, save_records
from router_training.tawp import Problem, Step

# Tom has 5 apples, buys 3 more, gives away 2: 5 + 3 = 8, 8 - 2 = 6.
TOM = Problem("t0", "Tom has 5 apples. Tom buys 3 more. Then Tom gives away 2. How many apples does Tom have now?",
              (Step(5, "+", 3, 8), Step(8, "-", 2, 6)), 6, "Tom", "apples")


def test_splits_are_disjoint_and_test_uses_held_out_names_and_items():
    s = tawp.make_splits({"reward": 300, "router": 100, "val": 60, "test": 80})
    questions = [p.question for probs in s.values() for p in probs]
    assert len(questions) == len(set(questions)) == 540
    assert all(p.name in tawp.TEST_NAMES and p.item in tawp.TEST_ITEMS for p in s["test"])
    assert not any(p.name in tawp.TEST_NAMES or p.item in tawp.TEST_ITEMS for p in s["reward"] + s["router"])
    # Deterministic: the same sizes give the same problems.
    assert tawp.make_splits({"val": 60})["val"] == s["val"]


def test_generated_chains_are_consistent_and_small():
    for p in tawp.make_splits({"reward": 500})["reward"]:
        assert 1 <= len(p.steps) <= 3
        assert p.steps[-1].c == p.answer
        for prev, step in zip(p.steps, p.steps[1:]):
            assert step.a == prev.c  # each line starts from the previous result
        for st in p.steps:
            assert {"+": st.a + st.b, "-": st.a - st.b, "*": st.a * st.b}[st.op] == st.c
            assert 0 <= st.c <= tawp.MAX_VALUE
        assert tawp.check_solution(p.gold_solution(), p).correct
        assert p.name in p.question and p.item in p.question


def test_one_prompt_system_line_and_worked_example():
    msgs = tawp.messages(TOM.question)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "one calculation per line" in msgs[0]["content"] and msgs[-1]["content"] == TOM.question
    assert msgs[2]["content"].endswith("The answer is 5.")


def test_checker_accepts_the_gold_chain_and_commuted_operands():
    assert tawp.check_solution("5 + 3 = 8\n8 - 2 = 6\nThe answer is 6.", TOM).correct
    assert tawp.check_solution("3 + 5 = 8\n8 - 2 = 6\nThe answer is 6.\nExtra chatter", TOM).correct
    # A calculation wrapped in prose is still checked.
    assert tawp.check_solution("Tom buys 3, so 5 + 3 = 8 apples.\nThen 8 - 2 = 6.\nThe answer is 6.", TOM).correct


def test_checker_finds_the_first_wrong_line_and_its_kind():
    cases = {
        "5 - 3 = 2\n2 - 2 = 0\nThe answer is 0.": (0, "operation", "5 + 3 = 8"),
        "5 + 4 = 9\n9 - 2 = 7\nThe answer is 7.": (0, "operand", "5 + 3 = 8"),
        "5 + 3 = 8\n8 - 2 = 5\nThe answer is 5.": (1, "result", "8 - 2 = 6"),
        "5 + 3 = 8\n8 - 2 = 6\nThe answer is 8.": (2, "final_answer", "The answer is 6."),
        "5 + 3 = 8\nThe answer is 8.": (1, "missing_step", "8 - 2 = 6"),
        "5 + 3 = 8\n8 - 2 = 6\n6 + 1 = 7\nThe answer is 7.": (2, "extra_step", "The answer is 6."),
        "Tom buys apples.\nThe answer is 6.": (0, "format", "5 + 3 = 8"),
        "5 + 3 - 2 = 6\nThe answer is 6.": (0, "format", "5 + 3 = 8"),
        "Tom gives away 3, so he has 5 - 3 = 2 apples.\nThe answer is 2.": (0, "operation", "5 + 3 = 8"),
    }
    for text, (line, kind, expected) in cases.items():
        chk = tawp.check_solution(text, TOM)
        assert not chk.correct
        assert (chk.first_error, chk.error_type, chk.expected) == (line, kind, expected), text
    # Graded by the final answer: a right answer after a wrong line still counts as answer-correct.
    assert tawp.check_solution("5 + 3 = 8\n8 - 2 = 5\nThe answer is 6.", TOM).answer_correct


def test_token_classes():
    ctx = TOM.context_words
    assert tawp.token_class("8", ctx) == "digits"
    assert tawp.token_class(" +", ctx) == "operators"
    assert tawp.token_class(" =", ctx) == "="
    assert tawp.token_class(" Tom", ctx) == "names/items"
    assert tawp.token_class(" apples", ctx) == "names/items"
    assert tawp.token_class(" answer", ctx) == "step words"
    assert tawp.token_class(" banana", ctx) == "other words"


def test_pairs_from_a_scripted_base(tmp_path):
    """The base's own samples -> the first wrong line (rejected) vs the gold line (chosen) under its own prefix."""
    samples = [[
        "5 + 3 = 8\n8 - 2 = 5\nThe answer is 5.",  # wrong result on line 2
        "5 + 3 = 8\n8 - 2 = 5\nThe answer is 5.",  # duplicate: deduplicated
        "5 - 3 = 2\nThe answer is 2.",  # wrong operator on line 1
        "5 + 3 = 8\n8 - 2 = 6\nThe answer is 6.",  # correct: router data
        "5 + 3 = 8\n8 - 2",  # truncated, nothing wrong yet: no pair
    ]]
    data = onpolicy.build_records([TOM], samples)
    assert [(p.initial_reason_steps, p.rejected, p.chosen, p.error_type) for p in data.pairs] == [
        ("5 + 3 = 8\n", "8 - 2 = 5", "8 - 2 = 6", "result"),
        ("", "5 - 3 = 2", "5 + 3 = 8", "operation"),
    ]
    assert data.pairs[0].full_chosen == "5 + 3 = 8\n8 - 2 = 6\nThe answer is 6."
    assert all(p.group == TOM.id and p.dataset == "tawp" for p in data.pairs)
    assert [s.solution for s in data.correct] == ["5 + 3 = 8\n8 - 2 = 6\nThe answer is 6."]
    assert data.stats["samples"] == 5 and data.stats["correct_traces"] == 1
    # The records survive a round trip through the JSONL files, error type included.
    save_records(tmp_path / "p.jsonl", data.pairs)
    loaded = load_step_pairs(tmp_path / "p.jsonl")
    assert loaded == data.pairs and isinstance(loaded[0], StepPair)


def test_pair_encoding_shares_one_whole_context(tokenizer):
    """Chosen and rejected see the same context, and nothing is cut at the front (chat header, question)."""
    import pytest

    from router_training.encoding import Encoder
    from router_training.errors import DataError

    pair = StepPair("tawp", TOM.question, "5 + 3 = 8\n", "8 - 2 = 6", "8 - 2 = 5", "", "", "6", "p0", "t0")
    enc = Encoder(tokenizer, max_len=256)
    ctx_c, chosen, ctx_r, rejected = enc.pair(pair)
    assert ctx_c == ctx_r
    full = enc.prompt_ids(TOM.question, "tawp")
    assert ctx_c[: len(full)] == full  # the whole prompt, chat header first
    assert tokenizer.decode(ctx_c).startswith("<|im_start|>system\n" + tawp.SYSTEM)
    assert tokenizer.decode(chosen) == "8 - 2 = 6" and tokenizer.decode(rejected) == "8 - 2 = 5"
    # A window too small for the context is an error naming the fix, never a silent cut at the front.
    with pytest.raises(DataError, match="--max-len"):
        Encoder(tokenizer, max_len=len(ctx_c) - 5).pair(pair)
