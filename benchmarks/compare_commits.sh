#!/bin/bash
# Training and prediction speed of two commits side by side, in one run on this machine:
# B0 256 px training and B5 512 px training + prediction, batch 8, each commit's own
# benchmarks/train_speed.py on its own package, taken in turn (A, B, A, B).
#   bash benchmarks/compare_commits.sh f71aaa6 HEAD
# JSON per commit and workload in benchmarks/results/compare_commits/.
set -eu
cd "$(dirname "$0")/.."
out=$PWD/benchmarks/results/compare_commits
mkdir -p "$out"
checkouts=$(mktemp -d)
trap 'for c in "$checkouts"/*; do git worktree remove --force "$c"; done; rm -rf "$checkouts"' EXIT
declare -A names
for rev in "$@"; do
  names[$rev]=$(git rev-parse --short "$rev")
  git worktree add --detach --quiet "$checkouts/${names[$rev]}" "$rev"
done
lscpu | grep "Model name"
run() {  # commit, tag, train_speed.py flags
  local commit=$1 tag=$2; shift 2
  echo "== $commit $tag $(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd "$checkouts/$commit" && PYTHONPATH=$PWD python benchmarks/train_speed.py \
      --frameworks=jaxseg --json_out="$out/$commit-$tag.json" "$@" 2>&1 |
      grep -E "img/s|RSS|FAILED|Error")
}
for rev in "$@"; do run "${names[$rev]}" b0 --tasks=train --rounds=5; done
for rev in "$@"; do
  run "${names[$rev]}" b5 --backbone=efficientnetb5 --image_size=512 --rounds=3 --warmup_steps=1
done
