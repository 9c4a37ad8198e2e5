#!/bin/bash
# Host memory allocators side by side (BENCHMARKS.md, "Host memory allocators"): B0 256 px
# training and B5 512 px training + prediction, batch 8, under each allocator in turn.
# Needs Debian's libtcmalloc-minimal4 and libjemalloc2. Results: benchmarks/results/allocators/.
set -u
cd "$(dirname "$0")/.."
lib=/usr/lib/x86_64-linux-gnu
out=benchmarks/results/allocators
mkdir -p "$out"
declare -A environments=(
  [today]=""
  [glibc_defaults]="JAXSEG_KEEP_FREED_MEMORY=0"
  [tunables]="JAXSEG_KEEP_FREED_MEMORY=0 GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
  [tcmalloc]="JAXSEG_KEEP_FREED_MEMORY=0 LD_PRELOAD=$lib/libtcmalloc_minimal.so.4"
  [jemalloc]="JAXSEG_KEEP_FREED_MEMORY=0 LD_PRELOAD=$lib/libjemalloc.so.2"
)
for variant in today glibc_defaults tunables tcmalloc jemalloc; do
  echo "== $variant $(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
  env ${environments[$variant]} python benchmarks/train_speed.py --frameworks=jaxseg \
      --tasks=train --rounds=5 --json_out="$out/$variant-b0.json" 2>&1 | grep -E "img/s|RSS|FAILED"
  env ${environments[$variant]} python benchmarks/train_speed.py --frameworks=jaxseg \
      --backbone=efficientnetb5 --image_size=512 --rounds=3 --warmup_steps=1 \
      --json_out="$out/$variant-b5.json" 2>&1 | grep -E "img/s|RSS|FAILED"
done
