"""One vLLM engine in a fresh process, driven by a JSON spec: the one engine driver of the benchmarks and tests.

    in_fresh_process(spec)          runs ``python -m benchmarks.engine_run SPEC.json OUT.json`` and returns OUT
    in_fresh_process(spec, module="benchmarks.accuracy", args=["--engine-worker"])   another module's worker

A fresh process per engine: one engine at a time, its memory freed on exit, nothing left over in the caller.

SPEC (this module's workers): {"worker": "throughput" | "greedy" | "profile", "model": path, "router": ckpt,
{name: ckpt} or null (null = stock vLLM), "reward", "dtype", "max_model_len", "eager", "engine_kwargs": {...},
"max_tokens", "prompts": [[ids]...], "runs": [{"label": ..., "extra_args": {...} or "extra_args_cycle": [{...}, ...]},
...]}

* throughput (+ "batch_sizes"): per run label and batch size, output tokens/s over the whole batch, TTFT and TPOT
  (p50/p99) from vLLM's per-request stats, and the process's peak RSS. EOS is ignored so every request makes
  exactly max_tokens tokens.
* greedy (+ optional "models": several stock-vLLM models, one after another): per run label, per prompt, the greedy
  ids and text, the top-2 logprobs of each step and the logprob of each sampled token.
* profile (+ "batch", "extra_args", "top"): torch.profiler's top ops by self CPU time over one batch of decoding.
* sequence (+ "specs": [SPEC, ...]): those workers one after another in this one process (the test suite's smokes:
  one start of Python and vLLM, ~10 s here, instead of one per engine); {"outputs": [OUT, ...]}.
"""

from __future__ import annotations

import collections
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def in_fresh_process(spec: dict, *, module: str = "benchmarks.engine_run", args: tuple[str, ...] = (),
                     env: dict | None = None, echo_prefix: str | None = None, timeout: float | None = None) -> dict:
    """Run ``python -m MODULE *ARGS SPEC.json OUT.json`` in a fresh process and return OUT; stderr lines starting
    with ``echo_prefix`` are echoed as they come (progress), the rest kept for the error (RuntimeError)."""
    with tempfile.TemporaryDirectory() as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec))
        proc = subprocess.Popen([sys.executable, "-m", module, *args, str(sp), str(op)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tail: collections.deque[str] = collections.deque(maxlen=80)
        t0 = time.monotonic()
        for line in proc.stderr:
            tail.append(line)
            if echo_prefix and line.startswith(echo_prefix):
                sys.stderr.write(line)
                sys.stderr.flush()
            if timeout is not None and time.monotonic() - t0 > timeout:
                proc.kill()
                break
        if proc.wait() != 0:
            raise RuntimeError(f"{module} engine failed (exit {proc.returncode}):\n" + "".join(tail)[-4000:])
        return json.loads(op.read_text())


# --- the workers (in the fresh process) -------------------------------------------------------------------------

def _engine(spec: dict, model: str | None = None):
    from vllm import LLM

    common = dict(dtype=spec.get("dtype", "float32"), max_model_len=spec.get("max_model_len", 1024),
                  enforce_eager=spec.get("eager", False), seed=0, **spec.get("engine_kwargs", {}))
    if spec.get("router"):
        from taro_vllm.serving.llm import taro_llm

        return taro_llm(model or spec["model"], spec["router"], spec.get("reward"), **common)
    return LLM(model=model or spec["model"], **common)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def throughput(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = _engine({**spec, "engine_kwargs": {"disable_log_stats": False, **spec.get("engine_kwargs", {})}})
    startup = time.perf_counter() - t0
    prompts = spec["prompts"]
    results = []
    for run in spec["runs"]:
        for bs in spec["batch_sizes"]:
            batch = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(bs)]
            # "extra_args_cycle": request i gets entry i % len (e.g. rows of one batch on different routers)
            cycle = run.get("extra_args_cycle") or [run.get("extra_args")]
            sp = [SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True,
                                 extra_args=cycle[i % len(cycle)]) for i in range(bs)]
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
    return {"startup_s": startup, "peak_rss_gib": peak_rss_gib, "results": results}


def greedy(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def one_engine(llm) -> dict:
        out = {}
        for run in spec.get("runs") or [{"label": "default"}]:
            sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True, logprobs=2,
                                extra_args=run.get("extra_args"))
            res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], sp, use_tqdm=False)
            out[run["label"]] = [
                {"ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text,
                 "top2": [[lp.logprob for lp in sorted(d.values(), key=lambda x: x.rank)][:2]
                          for d in r.outputs[0].logprobs],
                 "logprobs": [d[t].logprob for d, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]}
                for r in res]
        return out

    if "models" in spec:  # several stock-vLLM models, one engine at a time
        results = {}
        for name in spec["models"]:
            llm = _engine(spec, name)
            results[name] = one_engine(llm)
            del llm
        return results
    return one_engine(_engine(spec))


def profile(spec: dict) -> dict:
    """torch.profiler over one batch of decoding (in-process engine: the model runner's ops are in this process).
    Returns the top ops by self CPU time and the profiled wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _engine(spec)
    batch = [TokensPrompt(prompt_token_ids=spec["prompts"][i % len(spec["prompts"])]) for i in range(spec["batch"])]
    sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True,
                        extra_args=spec.get("extra_args"))
    llm.generate(batch, sp, use_tqdm=False)  # warm-up: compile, first allocations
    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(batch, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    ops = [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000, "cpu_total_ms": e.cpu_time_total / 1000,
            "calls": e.count} for e in prof.key_averages()]
    ops.sort(key=lambda o: -o["self_cpu_ms"])
    return {"wall_s": wall, "ops": ops[: spec.get("top", 30)],
            "taro_stages": [o for o in ops if o["name"].startswith("taro::")],
            "self_cpu_total_ms": sum(o["self_cpu_ms"] for o in ops)}


def sequence(spec: dict) -> dict:
    """Each of ``spec["specs"]`` by its worker, in turn; each engine is dropped before the next starts, so peak RSS
    is the process's running maximum rather than each engine's own."""
    outputs = []
    for sub in spec["specs"]:
        outputs.append(WORKERS[sub.get("worker", "throughput")](sub))
        gc.collect()  # the finished engine's memory, before the next one allocates its KV cache
    return {"outputs": outputs}


WORKERS = {"throughput": throughput, "greedy": greedy, "profile": profile, "sequence": sequence}


def main(spec_path: str, out_path: str) -> None:
    from taro_vllm import envs

    envs.engine_defaults(kv_cache_gib=2, in_process=True)
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(WORKERS[spec.get("worker", "throughput")](spec)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
