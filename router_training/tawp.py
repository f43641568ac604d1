"""TAWP: tiny arithmetic word problems, the in-domain task a 135M base model half-solves.

Why this task: GSM8K is at the floor for SmolLM2-135M (0-4 of 132 for every method), so no step reward can lift it.
TAWP problems have 1-3 operations on small numbers, a verb lexicon that maps to operators, and names/items as context
words; the base solves roughly a quarter to a half of them and its errors are local and checkable (a wrong operator,
a wrong operand carried over, a wrong result), which is exactly what a step-level reward model can learn to fix.

* :func:`make_splits` - disjoint problem sets for reward-train / router-train / validation / test (different seeds,
  no question shared between splits; the test split uses held-out names and items).
* :func:`messages` - the ONE prompt (system line + one worked example + the question) used for sampling, reward
  training, router training and evaluation.
* :func:`check_solution` - finds the first wrong line of a solution against the gold chain and classifies it.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

Op = Literal["+", "-", "*"]
Split = Literal["reward", "router", "val", "test"]

NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ella", "Noah", "Ruby",
         "Owen", "Ava", "Finn", "Ivy", "Luke", "Nora"]
ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books", "cards", "shells", "stamps", "coins",
         "balloons", "crayons", "buttons", "candies", "toys", "flowers"]
# Held out for the test split: "low a on context words" is only meaningful on words the router never saw.
TEST_NAMES = ["Paul", "Rosa", "Hugo", "Alice", "Omar", "Clara", "Ethan", "Grace", "Ivan", "Julia"]
TEST_ITEMS = ["beads", "tickets", "feathers", "pebbles", "ribbons", "keys", "bottles", "blocks"]

# Verb lexicon: the operator is implied by the verb, which is the step a small model gets wrong.
ADD_VERBS = ["gets {n} more", "buys {n} more", "finds {n} more", "is given {n} more", "wins {n} more"]
SUB_VERBS = ["gives away {n}", "loses {n}", "sells {n}", "drops {n}", "uses {n}"]
MUL_VERBS = ["doubles the number of {item}"]

SYSTEM = "Solve the problem. Write one calculation per line, then: The answer is N."
SHOT_QUESTION = "Kate has 4 plums. Kate buys 3 more. Then Kate gives away 2. How many plums does Kate have now?"
SHOT_SOLUTION = "4 + 3 = 7\n7 - 2 = 5\nThe answer is 5."

SPLIT_SEEDS: dict[str, int] = {"reward": 11, "router": 22, "val": 33, "test": 44}
OPS_WEIGHTS = {1: 0.4, 2: 0.4, 3: 0.2}  # number of operations per problem
MAX_VALUE = 30


@dataclass(frozen=True)
class Step:
    a: int
    op: str
    b: int
    c: int

    def line(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.c}"


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    steps: tuple[Step, ...]
    answer: int
    name: str
    item: str

    @property
    def context_words(self) -> tuple[str, str]:
        return (self.name, self.item)

    def gold_solution(self) -> str:
        return "\n".join([s.line() for s in self.steps] + [f"The answer is {self.answer}."])

    def to_json(self) -> dict:
        return {**asdict(self), "steps": [asdict(s) for s in self.steps]}

    @staticmethod
    def from_json(d: dict) -> "Problem":
        return Problem(d["id"], d["question"], tuple(Step(**s) for s in d["steps"]), d["answer"], d["name"],
                       d["item"])


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problem(rng: random.Random, pid: str, names: list[str], items: list[str]) -> Problem:
    name, item = rng.choice(names), rng.choice(items)
    n_ops = rng.choices(list(OPS_WEIGHTS), weights=list(OPS_WEIGHTS.values()))[0]
    value = rng.randint(2, 9)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for k in range(n_ops):
        choices = ["+"] + (["-"] if value >= 2 else []) + (["*"] if 2 * value <= MAX_VALUE and k > 0 else [])
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(1, min(9, MAX_VALUE - value))
            verb = rng.choice(ADD_VERBS).format(n=b)
        elif op == "-":
            b = rng.randint(1, min(9, value - 1))
            verb = rng.choice(SUB_VERBS).format(n=b)
        else:
            b = 2
            verb = rng.choice(MUL_VERBS).format(item=item)
        c = _apply(value, op, b)
        steps.append(Step(value, op, b, c))
        sentences.append(f"{'Then ' if k else ''}{name} {verb}.")
        value = c
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(pid, " ".join(sentences), tuple(steps), value, name, item)


def make_splits(sizes: dict[str, int]) -> dict[str, list[Problem]]:
    """Problems per split, disjoint by question text. Test draws from held-out names and items."""
    seen: set[str] = set()
    out: dict[str, list[Problem]] = {}
    # Evaluation splits first, so the training splits are the ones that skip collisions.
    for split in sorted(sizes, key=lambda s: ("test", "val", "router", "reward").index(s)):
        rng = random.Random(SPLIT_SEEDS[split])
        names, items = (TEST_NAMES, TEST_ITEMS) if split == "test" else (NAMES, ITEMS)
        probs: list[Problem] = []
        tries = 0
        while len(probs) < sizes[split]:
            tries += 1
            if tries > 200 * max(1, sizes[split]):
                raise ValueError(f"cannot draw {sizes[split]} distinct {split} problems")
            p = make_problem(rng, f"tawp-{split}-{len(probs)}", names, items)
            if p.question not in seen:
                seen.add(p.question)
                probs.append(p)
        out[split] = probs
    return out


def messages(question: str) -> list[dict[str, str]]:
    """The one TAWP prompt: system line, one worked example, the question."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": SHOT_QUESTION},
            {"role": "assistant", "content": SHOT_SOLUTION},
            {"role": "user", "content": question}]


# --- checking --------------------------------------------------------------------------------------------------

# A calculation anywhere in a line: small models often wrap it in prose ("so she has 3 - 1 = 2 marbles left").
_CALC = re.compile(r"(?<![\d.])(-?\d+)\s*([+\-*x×])\s*(-?\d+)\s*=\s*(-?\d+)(?![\d.]\d)")
_ANSWER = re.compile(r"^\s*The answer is\s*(-?\d+)\s*\.?\s*$", re.IGNORECASE)

ErrorType = Literal["operation", "operand", "result", "final_answer", "missing_step", "extra_step", "format"]


@dataclass
class Check:
    correct: bool  # every line right and the final answer right
    answer_correct: bool  # the final "The answer is N." states the gold answer (what evaluation grades)
    first_error: int | None = None  # index into ``lines``
    error_type: ErrorType | None = None
    expected: str | None = None  # the gold line that should have been written at ``first_error``
    lines: list[str] = field(default_factory=list)


def solution_lines(text: str) -> list[str]:
    """Non-empty lines up to and including the first answer line (what follows it is not graded)."""
    out = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        out.append(line)
        if _ANSWER.match(line):
            break
    return out


def final_answer(text: str) -> int | None:
    for line in solution_lines(text):
        m = _ANSWER.match(line)
        if m:
            return int(m.group(1))
    return None


def _same_step(a: int, op: str, b: int, gold: Step) -> bool:
    if op != gold.op:
        return False
    if (a, b) == (gold.a, gold.b):
        return True
    return op in "+*" and (b, a) == (gold.a, gold.b)  # commutative operands in either order are right


def check_solution(text: str, problem: Problem) -> Check:
    lines = solution_lines(text)
    ans = final_answer(text)
    answer_ok = ans == problem.answer
    gold = problem.steps
    answer_line = f"The answer is {problem.answer}."

    def fail(i: int, kind: ErrorType, expected: str) -> Check:
        return Check(False, answer_ok, i, kind, expected, lines)

    k = 0  # next gold step
    for i, line in enumerate(lines):
        expected = gold[k].line() if k < len(gold) else answer_line
        m_ans = _ANSWER.match(line)
        if m_ans:
            if k < len(gold):
                return fail(i, "missing_step", expected)
            if int(m_ans.group(1)) != problem.answer:
                return fail(i, "final_answer", expected)
            return Check(True, answer_ok, None, None, None, lines)
        m = _CALC.search(line)
        if not m or line[: m.start()].rstrip()[-1:] in ("+", "-", "*", "x", "×"):
            return fail(i, "format", expected)  # no calculation, or a chained one ("5 + 6 + 8 = 19")
        a, op, b, c = int(m.group(1)), m.group(2).replace("x", "*").replace("×", "*"), int(m.group(3)), \
            int(m.group(4))
        if k >= len(gold):
            return fail(i, "extra_step", expected)
        g = gold[k]
        if not _same_step(a, op, b, g):
            # The operator (the verb was misread) or an operand (a number carried over wrongly).
            kind: ErrorType = "operation" if op != g.op else "operand"
            return fail(i, kind, expected)
        if c != g.c:
            return fail(i, "result", expected)
        k += 1
    # Ran out of lines without an answer line (truncated or never concluded).
    return fail(len(lines), "missing_step" if k < len(gold) else "format", gold[k].line() if k < len(gold)
                else answer_line)


_CONTEXT = re.compile(r"^\s*(\w+) has \d+ (\w+)\.")


def context_words(question: str) -> tuple[str, ...]:
    """(name, item) of a TAWP question: the context words whose a_t should stay low."""
    m = _CONTEXT.match(question)
    return (m.group(1), m.group(2)) if m else ()


# --- token classes (a_t reporting) ------------------------------------------------------------------------------

STEP_WORDS = {"the", "answer", "is", "step", "then", "so", "total"}


def token_class(piece: str, context_words: tuple[str, ...] = ()) -> str:
    """Class of one generated token piece for the a_t-by-class tables."""
    s = piece.strip()
    low = s.lower()
    if not s:
        return "whitespace"
    if any(ch.isdigit() for ch in s):
        return "digits"
    if s == "=":
        return "="
    if all(ch in "+-*/x×÷" for ch in s):
        return "operators"
    words = {w.lower() for w in context_words}
    bare = re.sub(r"[^a-z]", "", low)
    if bare and any(bare == w or (len(bare) >= 3 and w.startswith(bare)) for w in words):
        return "names/items"
    if bare in STEP_WORDS:
        return "step words"
    if all(not ch.isalnum() for ch in s):
        return "punctuation"
    return "other words"
