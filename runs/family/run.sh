#!/bin/bash
# The Omniglot 5-way 1-shot family table of runs/README.md at three seeds, end to end:
# every algorithm of runs/family/ trained for 2,000 iterations at seeds 0, 1, 2 (two runs at
# a time), each finished run evaluated a second time non-transductively with 15 queries per
# class (MAML++ with BNRS: per_example; its checkpoints also with batch statistics,
# runs/family/batch_statistics.sh) while the others train, then the report.
#
#   MAML_TF_DATA_DIR=../shared/data/omniglot runs/family/run.sh $HOME/maml_runs/family [KEEP]
#
# Run it from the repository's root (a git worktree of a fixed commit for a long run).
# Resumable: the same command again skips finished runs and evaluations and resumes a
# stopped run; SIGTERM stops it with a checkpoint. About 7.5 hours on a 2-core CPU.
#
# KEEP (optional) is a folder that outlives the machine, such as runs/family/results of a
# checkout you commit from: each finished and evaluated run's JSON files (config, flags,
# results, sessions, history; no checkpoints, about 10 KB a run) are copied there, and back
# into WORKDIR at the start, so that on a new machine the sweep skips those runs. The table
# is then `python -m maml_tf.report KEEP`. A run stopped half-way is not kept: on a new
# machine it starts again. FLAGFILES=runs/family/a.cfg,runs/family/b.cfg,... runs those
# algorithms, in that order (cheapest first loses least to a lost machine).
set -u
W=${1:?usage: runs/family/run.sh WORKDIR [KEEP]}
K=${2:-}
PY=${PYTHON:-python}
cd "$(dirname "$0")/../.." || exit 1
mkdir -p "$W"
[ -n "$K" ] && [ -d "$K" ] && cp -rn "$K"/. "$W"/
sweep="" child="" nap=""
trap 'kill -TERM $sweep $child $nap 2>/dev/null; wait $sweep $child 2>/dev/null; exit 143' TERM INT

finished() {   # trained all its iterations (maml_tf.grid.finished, without importing TF)
  $PY - "$1" <<'EOF'
import json, os, sys
try:
    config = json.load(open(os.path.join(sys.argv[1], "config.json")))
    results = json.load(open(os.path.join(sys.argv[1], "results.json")))
    rule = config.get("evaluation", config).get("stop_when_flat", 0)
    stopped = rule and results.get("stopped_when_flat", {}).get("stop_when_flat") == rule
    sys.exit(not stopped and results["protocol"]["checkpoint_step"] != config.get("optim", config)["num_iterations"])
except (OSError, ValueError, KeyError):
    sys.exit(1)
EOF
}

evaluate_finished() {
  for d in "$W"/flagfile=*/seed-*; do
    finished "$d" || continue
    mode=support; [[ $d == *flagfile=mamlpp* ]] && mode=per_example
    if ! ls "$d"/results-*-15queries-$mode-seed*.json >/dev/null 2>&1; then
      $PY -m maml_tf.evaluate --workdir="$d" --eval_mode=$mode --eval_queries=15 & child=$!
      wait $child || { echo "The $mode evaluation of $d failed (exit $?); see above." >&2; continue; }
    fi
    if [ -n "$K" ]; then
      mkdir -p "$K/${d#"$W"/}"
      cp "$d"/config.json "$d"/flags.cfg "$d"/results*.json "$d"/sessions.json \
         "$d"/history.json "$K/${d#"$W"/}"/ 2>/dev/null
    fi
  done
  # MAML++'s finished seeds with batch statistics at test time: the table's "mamlpp" row.
  PYTHON=$PY runs/family/batch_statistics.sh "$W" "$K" & child=$!
  wait $child || echo "runs/family/batch_statistics.sh failed (exit $?); see above." >&2
}

$PY -m maml_tf.sweep --grid="flagfile=${FLAGFILES:-runs/family/*.cfg}" --seeds=3 --workdir="$W" \
    --jobs="${JOBS:-2}" & sweep=$!
while kill -0 $sweep 2>/dev/null; do
  evaluate_finished
  sleep 60 & nap=$!; wait $nap
done
wait $sweep; status=$?
[ $status -ge 128 ] && exit $status   # stopped by a signal; a failed run is reported below
evaluate_finished
$PY -m maml_tf.report "$W"
exit $status
