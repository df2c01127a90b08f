#!/bin/bash
# The Omniglot 5-way 1-shot family table of runs/README.md at three seeds, end to end:
# every algorithm of runs/family/ trained for 2,000 iterations at seeds 0, 1, 2 (one run at a
# time), then each checkpoint evaluated a second time non-transductively with 15 queries per
# class (MAML++ with BNRS: per_example), then the report.
#
#   MAML_TF_DATA_DIR=../shared/data/omniglot runs/family/run.sh $HOME/maml_runs/family
#
# Run it from the repository's root (a git worktree of a fixed commit for a long run).
# Resumable: the same command again skips finished runs and evaluations and resumes a
# stopped run; SIGTERM stops it with a checkpoint. About 6 hours on a 2-core CPU.
set -u
W=${1:?usage: runs/family/run.sh WORKDIR}
PY=${PYTHON:-python}
cd "$(dirname "$0")/../.." || exit 1
child=""
trap 'kill -TERM $child 2>/dev/null; wait $child; exit 143' TERM INT
$PY -m maml_tf.sweep --grid=flagfile=runs/family/*.cfg --seeds=3 --workdir="$W" & child=$!
wait $child; status=$?
[ $status -ge 128 ] && exit $status   # stopped by a signal; a failed run is reported below
for d in "$W"/flagfile=*/seed-*; do
  [ -f "$d/results.json" ] || continue
  mode=support; [[ $d == *flagfile=mamlpp* ]] && mode=per_example
  ls "$d"/results-*-15queries-$mode-seed*.json >/dev/null 2>&1 && continue
  $PY -m maml_tf.evaluate --workdir="$d" --eval_mode=$mode --eval_queries=15 & child=$!
  wait $child || exit $?
done
$PY -m maml_tf.report "$W"
exit $status
