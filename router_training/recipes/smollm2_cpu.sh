#!/usr/bin/env bash
# TARo end to end on SmolLM2-135M-Instruct, CPU, bounded time (~20-25 min on 2 shared cores, fp32):
#   data (GSM-symbolic Step-DPO pairs + solutions) -> reward model (GenARM, LoRA on the top layers, merged)
#   -> router (top-K, on the frozen base + the new reward model).
#
# Artefacts go to $RUN (default <cache>/runs/smollm2, where <cache> is taro_vllm's cache dir: $TARO_VLLM_CACHE, else
# ${XDG_CACHE_HOME:-~/.cache}/taro_vllm; the same place `taro-vllm demo` looks), never into the repo:
#   $RUN/data/      JSONL files + manifest.json
#   $RUN/reward/    the reward model (HF folder vLLM loads) + train/{metrics.jsonl,curves.png}
#   $RUN/router/    the router checkpoint (taro-router) + train/{metrics.jsonl,curves.png}
#     (`taro-vllm demo` serves $RUN/router when it exists)
#
# Re-running resumes a killed stage (--resume) and skips finished ones. Stage sizes are deliberately tiny:
# one SmolLM2 forward over 8 x 160 tokens takes ~14 s on this machine; see RESULTS.md for the numbers.
# Usage: nice -n 10 bash router_training/recipes/smollm2_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

# One source of truth for the cache: ask taro_vllm (the demo finds $RUN/router only if both agree).
CACHE=$(python -c "from taro_vllm.assets import cache_dir; print(cache_dir())")
RUN=${RUN:-$CACHE/runs/smollm2}
REWARD_STEPS=${REWARD_STEPS:-20}
ROUTER_STEPS=${ROUTER_STEPS:-40}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

BASE=$(python -c "from taro_vllm import assets; print(assets.build_smollm2())")
echo "base model: $BASE"
echo "run dir: $RUN"
mkdir -p "$RUN"
stamp() { date +%s; }

t0=$(stamp)
if [[ ! -f "$RUN/data/manifest.json" ]]; then
  python -m router_training data --out "$RUN/data" --variants 6
fi
t1=$(stamp); echo "data: $((t1 - t0)) s"

# Reward model: GSM pairs only here (champ's competition steps are 4x longer; the GPU recipe adds them).
if [[ ! -f "$RUN/reward/model.safetensors" ]]; then
  python -m router_training reward --model "$BASE" --data "$RUN/data/pairs_gsm.jsonl" --out "$RUN/reward" \
    --lora --lora-r 16 --lora-alpha 32 --lora-last-layers 8 --lr 5e-4 --warmup 4 --beta 0.05 \
    --max-steps "$REWARD_STEPS" --batch-size 4 --max-len 160 \
    --heldout-fraction 0.1 --max-eval 24 --eval-every "$REWARD_STEPS" --checkpoint-every 5 --seed 0 --resume
fi
t2=$(stamp); echo "reward: $((t2 - t1)) s"

if [[ ! -f "$RUN/router/model.safetensors" ]]; then
  python -m router_training router --base "$BASE" --reward "$RUN/reward" --data "$RUN/data/solutions_gsm.jsonl" \
    --out "$RUN/router" --kind topk --k 8 --source both --lr 3e-3 --warmup 4 \
    --max-steps "$ROUTER_STEPS" --batch-size 2 --max-len 160 \
    --heldout-fraction 0.1 --max-eval 12 --eval-every 20 --checkpoint-every 10 --seed 0 --resume
fi
t3=$(stamp); echo "router: $((t3 - t2)) s"

# Optional (EXTRA_ROUTERS=1, ~4 min more on an idle 2-core box): the full-logits router, and a top-K router with the preference term
# (the mixed distribution must prefer the chosen step over the rejected one), for benchmarks/accuracy.py.
if [[ "${EXTRA_ROUTERS:-0}" == 1 ]]; then
  EXTRA_STEPS=${EXTRA_STEPS:-30}
  common=(--base "$BASE" --reward "$RUN/reward" --data "$RUN/data/solutions_gsm.jsonl" --warmup 4
          --max-steps "$EXTRA_STEPS" --batch-size 2 --max-len 160 --heldout-fraction 0.1 --max-eval 12
          --eval-every "$EXTRA_STEPS" --checkpoint-every 10 --seed 0 --resume)
  [[ -f "$RUN/router_full/model.safetensors" ]] || \
    python -m router_training router "${common[@]}" --out "$RUN/router_full" --kind full --lr 1e-3
  [[ -f "$RUN/router_pref/model.safetensors" ]] || \
    python -m router_training router "${common[@]}" --out "$RUN/router_pref" --kind topk --k 8 --source both \
      --lr 3e-3 --pairs "$RUN/data/pairs_gsm.jsonl" --pref-weight 2.0 --pref-beta 0.1
fi
t4=$(stamp); echo "extra routers: $((t4 - t3)) s"
echo "total: $((t4 - t0)) s"
