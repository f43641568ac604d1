# Sourced by the recipes: the resumable stage runner. Needs $RUN.
# stage NAME DONE_FILE COMMAND...: skip when DONE_FILE exists, else run and append the wall time to $RUN/timings.jsonl.
stage() {
  local name=$1 done_file=$2; shift 2
  if [[ -e "$done_file" ]]; then echo "== $name: done ($done_file)"; return 0; fi
  echo "== $name"
  local t0; t0=$(date +%s)
  "$@"
  local dt=$(( $(date +%s) - t0 ))
  echo "{\"stage\": \"$name\", \"seconds\": $dt}" >> "$RUN/timings.jsonl"
  echo "== $name: ${dt} s"
}

# gate_b_check FILE: one line of the reward model's held-out on-policy pair accuracy; exit 3 unless it passed
# (FORCE=1 continues anyway).
gate_b_check() {
  if ! python - "$1" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
print(f"gate B: reward acc {g['pairwise_accuracy_reward']:.3f} vs base {g['pairwise_accuracy_base']:.3f}; "
      f"flip@0.5 {g['flip_rate']['0.5']:.3f}; passed={g['passed']}")
sys.exit(0 if g["passed"] else 1)
PY
  then
    [[ "${FORCE:-0}" == 1 ]] && return 0
    echo "gate B failed: the reward model does not know more than the base on held-out on-policy pairs;" \
         "see $1 (FORCE=1 continues anyway)"
    exit 3
  fi
}

# feature_caches BASE SUFFIX MAX_TAWP MAX_GENERAL [FEATURES_FLAGS...]: the stages features$SUFFIX (the router
# split's traces, gold lines and pairs -> $RUN/cache$SUFFIX) and features_general$SUFFIX (the base's general answers
# -> $RUN/cache_general$SUFFIX), from BASE and the run's reward model.
feature_caches() {
  local base=$1 suffix=$2 max_tawp=$3 max_general=$4; shift 4
  stage "features$suffix" "$RUN/cache$suffix/cache.json" \
    python -m router_training features --base "$base" --reward "$RUN/reward" "$@" \
      --data "$RUN/data/correct_router.jsonl" --data "$RUN/data/gold_router.jsonl" --pairs "$RUN/data/pairs_router.jsonl" \
      --out "$RUN/cache$suffix" --max-per-file "$max_tawp"
  stage "features_general$suffix" "$RUN/cache_general$suffix/cache.json" \
    python -m router_training features --base "$base" --reward "$RUN/reward" "$@" --data "$RUN/data/general.jsonl" \
      --out "$RUN/cache_general$suffix" --max-per-file "$max_general"
}
