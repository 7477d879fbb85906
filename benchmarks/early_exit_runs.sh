#!/bin/bash
# The training runs behind docs/early-exits.md, per seed: static -> exits (--init static) ->
# metanetwork (--init exits), into RUNS/<model>/seed<s>/ (RUNS defaults to runs/ee). A step whose
# metrics.json exists is skipped, so an interrupted chain resumes.
#   MODEL=lenet benchmarks/early_exit_runs.sh 0 1 2
#   MODEL=mobilenet DATA=../shared/data/mnist benchmarks/early_exit_runs.sh 0
set -e
M=${MODEL:-lenet}
RUNS=${RUNS:-runs/ee}
DATA=${DATA:-../shared/data/mnist}
PY=${PYTHON:-.venv/bin/python}
for s in "$@"; do
  d=$RUNS/$M/seed$s
  train() { $PY -m mntool.cli.main train --task mnist --model "$M" --seed "$s" --data "$DATA" --quiet "$@"; }
  [ -f "$d/static/metrics.json" ] || train --method static --epochs 12 --out "$d/static"
  [ -f "$d/exits/metrics.json" ] || train --method exits --init "$d/static" --out "$d/exits"
  [ -f "$d/metanetwork/metrics.json" ] || train --method metanetwork --init "$d/exits" --out "$d/metanetwork"
done
