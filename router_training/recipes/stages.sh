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
  python - "$1" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
print(f"gate B: reward acc {g['pairwise_accuracy_reward']:.3f} vs base {g['pairwise_accuracy_base']:.3f}; "
      f"flip@0.5 {g['flip_rate']['0.5']:.3f}; passed={g['passed']}")
PY
  if [[ "$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['passed'])" "$1")" != True \
        && "${FORCE:-0}" != 1 ]]; then
    echo "gate B failed: the reward model does not know more than the base on held-out on-policy pairs;" \
         "see $1 (FORCE=1 continues anyway)"
    exit 3
  fi
}
