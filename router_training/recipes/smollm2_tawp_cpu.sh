#!/usr/bin/env bash
# TARo that routes, in miniature, on SmolLM2-135M-Instruct, CPU (~2 h on 2 cores):
#   1 onpolicy  TAWP problems (disjoint reward / router / val / test splits); the base's own solutions sampled
#               through the plugin (taro_mode=base); first wrong line vs gold line = on-policy Step-DPO pairs.
#               Gate A: base greedy accuracy on validation within [15%, 60%].
#   1b general  200 everyday prompts (disjoint from the OOD evaluation) answered by the base itself: text where the
#               router should leave the base alone.
#   2 reward    GenARM loss (beta 0.1) + NLL on the chosen step (lambda 1; a documented deviation), LoRA.
#   3 gate B    held-out on-policy pairs (the router split's, never trained on by the reward model): reward model
#               vs base pairwise accuracy, flip rate of the first divergent token under the mix.
#   4 features  the frozen models' router features + exact mixed-NLL terms, cached (router split only); the same
#               for the general answers.
#   5 routers   top-K router, NLL of the mix at informative positions, + KL(base || mix) on the general answers;
#               and the same + preference on the mix. Gate C (oracle per-token a vs best fixed a) is in each
#               router's train/report.json.
#   6 accuracy  through the server path: base, reward, fixed-a sweep, the router(s) on val (selection) and test
#               (McNemar), OOD (n=100), a_t by token class, alphas.html. The val-selected router becomes
#               $RUN/router, which `taro-vllm demo` serves.
# Optional: FULL=1 also trains and evaluates the full-logits router (see below).
# Optional: ABLATION=1 also trains the pure-GenARM reward model (lambda 0) and reports its gate B.
#
# Re-running resumes: finished stages are skipped, the reward stage resumes from its last checkpoint, the feature
# cache from its last shard. Stage wall times go to $RUN/timings.jsonl.
# Usage: nice -n 5 bash router_training/recipes/smollm2_tawp_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

CACHE=$(python -c "from taro_vllm import assets; print(assets.cache_dir())")
RUN=${RUN:-$CACHE/runs/smollm2-tawp}
REWARD_PAIRS=${REWARD_PAIRS:-400}
REWARD_BATCH=${REWARD_BATCH:-8}
REWARD_STEPS=${REWARD_STEPS:-$((REWARD_PAIRS / REWARD_BATCH))}
# 500 steps, 4-dim token embeddings, lr 3e-4: with 16-dim embeddings and 1500 steps the router overfit the ~2.8k
# training rows (validation NLL 0.79 vs 0.32 for the best fixed a); these settings reach 0.28 (see RESULTS.md).
ROUTER_STEPS=${ROUTER_STEPS:-500}
ROUTER_FLAGS=${ROUTER_FLAGS:---embed-dim 4 --lr 3e-4}
GENERAL_FLAGS=${GENERAL_FLAGS:---general-cache $RUN/cache_general --general-weight 1.0}
EAGER=${EAGER:---eager}   # each stage starts a fresh engine: eager skips its torch.compile (first compile ~1.5 min here)
mkdir -p "$RUN"
BASE=$(python -c "from taro_vllm import assets; print(assets.build_smollm2())")
echo "base model: $BASE  run: $RUN"

source router_training/recipes/stages.sh  # stage (resumable), gate_b_check, feature_caches

stage onpolicy "$RUN/data/manifest.json" \
  python -m router_training onpolicy --out "$RUN/data" --base "$BASE" --reward-problems 250 --router-problems 150 \
    --val-problems 100 --test-problems 400 --samples 2 --temperature 0.8 --max-tokens 48 $EAGER

stage general "$RUN/data/general.jsonl" \
  python -m router_training general --out "$RUN/data" --base "$BASE" --prompts 200 --samples 2 --temperature 1.0 \
    --max-tokens 48 $EAGER

reward() {  # reward OUT NLL_WEIGHT
  python -m router_training reward --model "$BASE" --data "$RUN/data/pairs_reward.jsonl" --out "$1" \
    --beta 0.1 --nll-weight "$2" --lora --lora-r 32 --lora-alpha 64 --lora-last-layers 12 --lr 5e-4 --warmup 8 \
    --max-steps "$REWARD_STEPS" --batch-size "$REWARD_BATCH" --max-len 384 --max-train-pairs "$REWARD_PAIRS" \
    --heldout-fraction 0.05 --max-eval 32 --eval-every "$REWARD_STEPS" --checkpoint-every 10 --seed 0 --resume
}
stage reward "$RUN/reward/model.safetensors" reward "$RUN/reward" 1.0

stage gate_b "$RUN/gate_b.json" \
  python -m router_training.gates --base "$BASE" --reward "$RUN/reward" --pairs "$RUN/data/pairs_router.jsonl" \
    --correct "$RUN/data/correct_router.jsonl" --max-pairs 200 --out "$RUN/gate_b.json" --no-fail
gate_b_check "$RUN/gate_b.json"

feature_caches "$BASE" "" 120 320

stage router_nll "$RUN/router_nll/model.safetensors" \
  python -m router_training fit-router --cache "$RUN/cache" --out "$RUN/router_nll" --objective nll \
    --steps "$ROUTER_STEPS" $ROUTER_FLAGS $GENERAL_FLAGS
stage router_pref "$RUN/router_pref/model.safetensors" \
  python -m router_training fit-router --cache "$RUN/cache" --out "$RUN/router_pref" --objective nll+pref \
    --steps "$ROUTER_STEPS" $ROUTER_FLAGS $GENERAL_FLAGS

# The evaluation is the issue's: base, reward alone, a fixed-a sweep, both routers (the val-selected one is reported
# as TARo), test n=400, OOD n=100, a 30-item GSM-symbolic slice (reported only). It costs ~0.75 s per generation per
# method here (both models run for every method): about 70 min of the recipe. Smaller: N_TEST=200 MAX_GSM=0
# EXTRA=--no-reward-alone. On a GPU: ALPHAS="0.1 0.15 0.3 0.5 0.75".
N_TEST=${N_TEST:-400}
ALPHAS=${ALPHAS:-0.15 0.3}
MAX_GSM=${MAX_GSM:-30}
EXTRA=${EXTRA:---extra-router pref=$RUN/router_pref}
stage accuracy "$RUN/eval/accuracy.json" \
  python -m benchmarks.accuracy --task tawp --data "$RUN/data" --router "$RUN/router_nll" $EXTRA \
    --alphas $ALPHAS --n-test "$N_TEST" --n-ood 100 --max-gsm "$MAX_GSM" --variants 0 $EAGER --out "$RUN/eval"

# Optional (FULL=1, ~45 min more): the full-logits router on the same data. Its caches keep both models' whole
# log-prob rows (fp16, 1.2 + 1.6 GB on disk), each fit takes ~8 min (500 steps on 2 cores), and the evaluation
# reuses every other method's outputs from $RUN/eval (only the full routers' TARo runs). Two learning rates (the
# full router's 2V-wide first layer moves fast under Adam: 1e-4 put a_t at 0.5 on names and items); the
# evaluation selects on validation accuracy among all routers. $RUN/eval_full then holds everything.
FULL_LRS=${FULL_LRS:-1e-5 3e-5}
EVAL=$RUN/eval
if [[ "${FULL:-0}" == 1 ]]; then
  feature_caches "$BASE" _full 120 320 --full-rows
  FULL_EXTRA=()
  for lr in $FULL_LRS; do
    stage "router_full_lr$lr" "$RUN/router_full_lr$lr/model.safetensors" \
      python -m router_training fit-router --cache "$RUN/cache_full" --out "$RUN/router_full_lr$lr" --kind full \
        --objective nll+pref --steps "$ROUTER_STEPS" --lr "$lr" --hidden-dim 32 \
        --general-cache "$RUN/cache_general_full" --general-weight 1.0
    FULL_EXTRA+=(--extra-router "full-logits lr$lr=$RUN/router_full_lr$lr")
  done
  stage accuracy_full "$RUN/eval_full/accuracy.json" \
    python -m benchmarks.accuracy --task tawp --data "$RUN/data" --router "$RUN/router_nll" $EXTRA "${FULL_EXTRA[@]}" \
      --reuse "$RUN/eval" --alphas $ALPHAS --n-test "$N_TEST" --n-ood 100 --max-gsm "$MAX_GSM" --variants 0 $EAGER \
      --out "$RUN/eval_full"
  EVAL=$RUN/eval_full
fi

# The val-selected router is the one the demo serves.
python - "$RUN" "$EVAL" <<'EOF'
import json, os, sys
from pathlib import Path
run = Path(sys.argv[1])
report = json.loads((Path(sys.argv[2]) / "accuracy.json").read_text())
chosen = report.get("selected_router") or str(run / "router_nll")
link = run / "router"
if link.is_symlink() or link.exists():
    link.unlink()
link.symlink_to(Path(chosen).resolve())
print(f"demo router: {link} -> {chosen}")
EOF

if [[ "${ABLATION:-0}" == 1 ]]; then
  stage reward_genarm "$RUN/reward_genarm/model.safetensors" reward "$RUN/reward_genarm" 0.0
  stage gate_b_genarm "$RUN/gate_b_genarm.json" \
    python -m router_training.gates --base "$BASE" --reward "$RUN/reward_genarm" \
      --pairs "$RUN/data/pairs_router.jsonl" --correct "$RUN/data/correct_router.jsonl" --max-pairs 200 \
      --out "$RUN/gate_b_genarm.json" --no-fail
fi
echo "timings:"; cat "$RUN/timings.jsonl"
