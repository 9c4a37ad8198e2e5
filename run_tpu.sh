#!/usr/bin/env bash
# Train jaxseg on a Cloud TPU VM: one host (v3-8, v4-8, v5e-8) or every host of a pod slice.
#
#   path/to/jaxseg/run_tpu.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   jaxseg/run_tpu.sh b5 gs://BUCKET/run1 --config.data_dir=gs://BUCKET/tiles
#
# CONFIG is a packaged config's name (b5, cpu, default) or a config file. Paths are taken
# as given, relative to the directory you run it from. On a pod slice run the same command
# on every host at once (gcloud ... ssh --worker=all, see the README's "Train on a TPU pod
# slice"): JAX finds the other hosts itself, each host reads its own shard of the record
# files, and process 0 alone prints and writes the run's files.
# Running the same command again resumes, also after a preemption.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
repo=$(cd "$(dirname "$0")" && pwd)
# The [tpu] extra pins jax[tpu] to the JAX version jaxseg is tested with.
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet -e "${repo}[tpu]"
exec python3 -m jaxseg.train --config="$config" --workdir="$workdir" --multihost "$@"
