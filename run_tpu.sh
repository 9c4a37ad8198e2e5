#!/usr/bin/env bash
# Train jaxseg on a Cloud TPU VM (v3-8 or a pod slice).
#
#   ./run_tpu.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   ./run_tpu.sh configs/b5.py gs://bucket/run1 --config.data_dir=gs://bucket/tiles
#
# On a pod slice run it on every host at once, with MULTIHOST=1, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all \
#     --command="cd jaxseg && MULTIHOST=1 ./run_tpu.sh configs/b5.py gs://bucket/run1 ..."
# Each host then reads its own shard of the record files and jax.distributed joins them.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")"
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet "jax[tpu]" -e .
extra=()
if [ "${MULTIHOST:-0}" = "1" ]; then
  extra+=(--multihost)
fi
exec python3 -m jaxseg.train --config="$config" --workdir="$workdir" "${extra[@]}" "$@"
