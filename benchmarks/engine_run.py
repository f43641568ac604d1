"""One vLLM engine, timed: ``python -m benchmarks.engine_run SPEC.json OUT.json`` (a fresh process per engine).

SPEC: {"model": path, "router": ckpt or null, "dtype", "max_model_len", "eager", "max_tokens",
       "prompts": [[ids]...], "batch_sizes": [...], "runs": [{"label": ..., "extra_args": {...}}, ...]}
For each run label and batch size: output tokens/s over the whole batch, TTFT and TPOT (p50/p99) from vLLM's
per-request stats, and the process's peak RSS. EOS is ignored so every request makes exactly max_tokens tokens.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from taro_vllm import envs

envs.engine_defaults(kv_cache_gib=2, in_process=True)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(spec_path))
    common = dict(dtype=spec["dtype"], max_model_len=spec["max_model_len"], enforce_eager=spec["eager"], seed=0,
                  disable_log_stats=False)
    t0 = time.perf_counter()
    if spec.get("router"):
        from taro_vllm.serving.llm import taro_llm

        llm = taro_llm(spec["model"], spec["router"], spec.get("reward"), **common)
    else:
        llm = LLM(model=spec["model"], **common)
    startup = time.perf_counter() - t0
    prompts = spec["prompts"]
    results = []
    for run in spec["runs"]:
        for bs in spec["batch_sizes"]:
            batch = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(bs)]
            sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True,
                                extra_args=run.get("extra_args"))
            llm.generate(batch[: min(bs, 2)], SamplingParams(max_tokens=4, ignore_eos=True,
                                                             extra_args=run.get("extra_args")), use_tqdm=False)
            t = time.perf_counter()
            outs = llm.generate(batch, sp, use_tqdm=False)
            wall = time.perf_counter() - t
            n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            ttft = [o.metrics.first_token_latency for o in outs if o.metrics]
            tpot = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / max(1, len(o.outputs[0].token_ids) - 1)
                    for o in outs if o.metrics]
            results.append({"label": run["label"], "batch_size": bs, "output_tokens": n_tokens, "seconds": wall,
                            "tokens_per_s": n_tokens / wall, "ttft_p50_s": percentile(ttft, 50),
                            "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99)})
            print(json.dumps(results[-1]), file=sys.stderr)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    json.dump({"startup_s": startup, "peak_rss_gib": peak_rss_gib, "results": results}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
