#!/bin/bash
# The family table's "mamlpp" row beside "mamlpp (BNRS)": each finished MAML++ seed's final
# checkpoint evaluated with batch statistics at test time instead of its running ones (the
# transductive protocol, then support with 15 queries per class). Training is the same with
# and without --bnrs, so this is a copy of the run's workdir with "bnrs": false in its
# config.json, evaluated by python -m maml_tf.evaluate; it has no training time of its own.
#
#   runs/family/batch_statistics.sh WORKDIR [KEEP]     (run.sh calls it; it needs checkpoints)
#
# Each copy is WORKDIR/flagfile=mamlpp,batch_statistics/seed-K. KEEP: as for run.sh, the
# copies' config, flags and results files go there too. Safe to repeat: what is done is skipped.
set -u
W=${1:?usage: runs/family/batch_statistics.sh WORKDIR [KEEP]}
K=${2:-}
PY=${PYTHON:-python}
child=""
trap 'kill -TERM $child 2>/dev/null; wait $child 2>/dev/null; exit 143' TERM INT

for d in "$W"/flagfile=mamlpp/seed-*; do
  [ -f "$d/results.json" ] && [ -d "$d/checkpoints" ] || continue
  b="$W/flagfile=mamlpp,batch_statistics/$(basename "$d")"
  if [ ! -f "$b/config.json" ]; then
    rm -rf "$b.tmp" && mkdir -p "$b.tmp" && cp -r "$d/config.json" "$d/flags.cfg" "$d/checkpoints" "$b.tmp"/ || exit 1
    $PY - "$b.tmp" "$b" <<'EOF' || exit 1
import json, os, sys
copy, final = sys.argv[1:]
path = os.path.join(copy, "config.json")
config = json.load(open(path))
config.get("learner", config)["bnrs"] = False   # sectioned, or flat as older runs wrote it
json.dump(config, open(path, "w"), indent=2)
flags = os.path.join(copy, "flags.cfg")
lines = [("--bnrs=false" if line.startswith("--bnrs=") else
          f"--workdir={final}" if line.startswith("--workdir=") else line.rstrip("\n"))
         for line in open(flags)]
open(flags, "w").write("\n".join(lines) + "\n")
EOF
    mv "$b.tmp" "$b" || exit 1
  fi
  for mode in transductive support; do
    queries=15; [ $mode = transductive ] && queries=1
    ls "$b"/results-*-${queries}queries-$mode-seed*.json >/dev/null 2>&1 && continue
    $PY -m maml_tf.evaluate --workdir="$b" --eval_mode=$mode --eval_queries=$queries & child=$!
    wait $child || { echo "The $mode evaluation of $b failed (exit $?); see above." >&2; exit 1; }
  done
  if [ -n "$K" ]; then
    mkdir -p "$K/${b#"$W"/}"
    cp "$b"/config.json "$b"/flags.cfg "$b"/results-*.json "$K/${b#"$W"/}"/
  fi
done
