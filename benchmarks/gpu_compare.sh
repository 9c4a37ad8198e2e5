#!/usr/bin/env bash
# jaxseg beside segmentation_models_pytorch on one GPU: Unet-efficientnetb5, 512x512,
# batch 8, float32 and bfloat16, one JSON per run in ${1:-gpu_results}.
# Needs jax[cuda], flax, optax, orbax-checkpoint, torch and segmentation-models-pytorch.
# PEAK_FP32 / PEAK_BF16 (dense TFLOP/s) default to an H100/H200 SXM's datasheet values for
# TF32 and bfloat16 tensor cores (both frameworks run float32 convolutions as TF32).
set -uo pipefail
TASKS=(${TASKS:+--tasks=$TASKS})
out=${1:-gpu_results}
mkdir -p "$out"
here=$(dirname "$0")
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
common=(--backbone=efficientnetb5 --image_size=512 --batch_size=8 --warmup_steps=3 "${TASKS[@]}"
        --rounds=5 --steps_per_round=10)
status=0
python3 "$here/train_speed.py" "${common[@]}" --frameworks=jaxseg,smp --half_precision \
    --peak_tflops="${PEAK_BF16:-989.4}" --json_out="$out/b5_512_bfloat16.json" || status=1
python3 "$here/train_speed.py" "${common[@]}" --frameworks=jaxseg,smp \
    --peak_tflops="${PEAK_FP32:-494.7}" --json_out="$out/b5_512_float32.json" || status=1
python3 "$here/train_speed.py" "${common[@]}" --frameworks=jaxseg --tasks=train \
    --half_precision --remat=false --peak_tflops="${PEAK_BF16:-989.4}" \
    --json_out="$out/b5_512_bfloat16_no_remat.json" || status=1
exit $status
