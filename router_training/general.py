"""General (non-math) prompts whose answers the base model writes itself: the router's "stay with the base" data.

Why: a router trained only on TAWP traces and pairs never sees text where the reward model has nothing to add, so
out of domain it keeps a_t near its in-domain average (0.19 served, against the issue's target <= 0.1). Here the
base answers short everyday instructions (sampled through the plugin, ``taro_mode=base``), and the router is asked
to keep the mix close to the base's own next-token distribution at every position of those answers
(``feature_cache.cached_kl_to_base``): exact in expectation, no reference answers needed, and it says nothing about
math, so the in-domain objective is untouched.

The prompts are disjoint from the out-of-domain evaluation (``benchmarks.ood_tasks``): other instructions, other
words (tests/test_general.py checks both), so the OOD numbers stay a held-out measurement.
"""

from __future__ import annotations

import random
import re

from router_training.data import Solution

DATASET = "general"  # one user turn (encoding.PROMPT_FORMATS has no entry): the OOD evaluation's prompt format

NOUNS = ["tiger", "ocean", "teapot", "lantern", "piano", "blanket", "compass", "island", "kettle", "ladder",
         "notebook", "orchard", "parrot", "quilt", "saddle", "tunnel", "umbrella", "valley", "wagon", "whistle",
         "zebra", "dolphin", "volcano", "library", "bicycle", "desert", "guitar", "pillow", "sandwich", "train"]
ADJECTIVES = ["brave", "quiet", "bright", "gentle", "tiny", "ancient", "busy", "calm", "clever", "cozy"]
FRIENDS = ["Marta", "Oscar", "Priya", "Felix", "Nadia", "Victor", "Ines", "Kofi"]
PLACES = ["sea", "jungle", "desert", "mountains", "arctic", "savanna"]
LANGUAGES = ["French", "Spanish", "German", "Italian"]
SEASONS = ["spring", "summer", "autumn", "winter"]

TEMPLATES = [
    lambda r: f"Write one short sentence about a {r.choice(NOUNS)}.",
    lambda r: f"Give one word that rhymes with '{r.choice(NOUNS)}'.",
    lambda r: f"What is the plural of '{r.choice(NOUNS)}'? Reply with one word.",
    lambda r: f"Describe a {r.choice(NOUNS)} in three words.",
    lambda r: f"Give a synonym for '{r.choice(ADJECTIVES)}'.",
    lambda r: f"Write a friendly greeting for {r.choice(FRIENDS)}.",
    lambda r: f"Name an animal that lives in the {r.choice(PLACES)}.",
    lambda r: f"How do you say 'thank you' in {r.choice(LANGUAGES)}?",
    lambda r: f"Which season comes after {r.choice(SEASONS)}?",
    lambda r: f"Write a title for a short story about a {r.choice(ADJECTIVES)} {r.choice(NOUNS)}.",
    lambda r: f"Complete the sentence: The {r.choice(NOUNS)} was",
    lambda r: f"Is a {r.choice(NOUNS)} alive? Answer yes or no, then explain in one sentence.",
]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct instructions from randomly drawn templates (deterministic in ``seed``)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"only {len(out)} distinct general prompts exist (asked for {n})")
        text = rng.choice(TEMPLATES)(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def context_words(prompt: str) -> tuple[str, ...]:
    """The prompt's own content words (the a_t-by-class tables call them names/items)."""
    vocab = set(NOUNS) | set(ADJECTIVES) | set(FRIENDS) | set(PLACES) | set(LANGUAGES) | set(SEASONS)
    return tuple(w for w in re.findall(r"[A-Za-z]+", prompt) if w in vocab)


def records(prompts: list[str], answers: list[list[str]]) -> list[Solution]:
    """One trace per distinct non-empty answer; ``group`` = the prompt, so a split never shares a prompt."""
    out: list[Solution] = []
    for i, (prompt, texts) in enumerate(zip(prompts, answers)):
        for j, text in enumerate(dict.fromkeys(t.strip() for t in texts)):
            if text:
                out.append(Solution(prompt, text, f"general-{i}-{j}", f"general-{i}", DATASET))
    return out
