"""An out-of-domain task with exact grading: short instructions that have nothing to do with math.

Why this task: the paper's point is that a weight tuned for the math reward model hurts other tasks while the
router does not. A math step reward should not help with "write this word in capitals"; a fixed high weight on it
can pull the model into "Step 1:" scaffolds or numbers and fail the instruction. Offline, deterministic, exactly
checkable, and within reach of a 135M instruct model (unlike competition math such as CHAMP, where every method of a
135M model scores ~0 and the comparison carries no signal).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

WORDS = ["apple", "river", "garden", "silver", "window", "planet", "candle", "forest", "mirror", "basket",
         "violin", "harbor", "pencil", "meadow", "castle", "rocket", "turtle", "lemon", "bridge", "cloud"]


@dataclass(frozen=True)
class Task:
    id: str
    instruction: str
    check: Callable[[str], bool]


def _norm(s: str) -> str:
    return s.strip().strip(".!\"'").strip()


def make_tasks(n: int = 100, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    makers = []

    def upper(i):
        w = rng.choice(WORDS)
        return Task(f"upper-{i}", f"Write the word '{w}' in capital letters. Reply with the word only.",
                    lambda out, w=w: w.upper() in out and w not in out.replace(w.upper(), ""))

    def first_letter(i):
        w = rng.choice(WORDS)
        return Task(f"first-{i}", f"What is the first letter of the word '{w}'? Reply with the letter only.",
                    lambda out, w=w: _norm(out).lower()[:1] == w[0] and len(_norm(out)) <= 3)

    def repeat(i):
        w, k = rng.choice(WORDS), rng.choice([2, 3])
        return Task(f"repeat-{i}", f"Repeat the word '{w}' exactly {k} times, separated by spaces.",
                    lambda out, w=w, k=k: out.lower().count(w) == k)

    def opposite(i):
        a, b = rng.choice([("hot", "cold"), ("up", "down"), ("big", "small"), ("day", "night"), ("yes", "no"),
                           ("fast", "slow"), ("open", "closed"), ("happy", "sad")])
        return Task(f"opposite-{i}", f"What is the opposite of '{a}'? Reply with one word.",
                    lambda out, b=b: b in out.lower())

    def capital(i):
        c, cap = rng.choice([("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
                             ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa")])
        return Task(f"capital-{i}", f"What is the capital of {c}? Reply with the city name only.",
                    lambda out, cap=cap: cap.lower() in out.lower())

    makers = [upper, first_letter, repeat, opposite, capital]
    return [makers[i % len(makers)](i) for i in range(n)]
