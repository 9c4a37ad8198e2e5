"""Does the device ever wait for the host in the train loop? A profiler trace says.

    python benchmarks/device_idle.py                                   # Unet-b0, 256 px
    python benchmarks/device_idle.py --backbone=efficientnetb5 --image_size=512 --batch_size=2
    python benchmarks/device_idle.py --host_delay_ms=3000    # a host slower than the step

Runs `train.train_epoch`, the loop training runs (tf.data batches of random tiles, uint8 to
the device, the compiled train step, metrics read back `--metrics_every` steps at a time),
for one untimed epoch (compile, warm-up), then for `--steps` steps under
`jax.profiler.trace`. In the Perfetto trace the XLA threads' op events give when the
device computed; merged where less than 5 ms apart (the dispatch gaps between a step's
own ops), they leave the gaps in which the device had nothing to run, between its first
and last op of the traced epoch: time it waited for the host. (A step's own pauses over
5 ms would count too, so the idle time reported is an upper bound.)
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
import time

from absl import app, flags
import numpy as np

_BACKBONE = flags.DEFINE_string("backbone", "efficientnetb0", "EfficientNet variant")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "tile side in pixels")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "examples per device per step")
_STEPS = flags.DEFINE_integer("steps", 12, "traced steps")
_METRICS_EVERY = flags.DEFINE_integer("metrics_every", 10, "config.metrics_every_steps")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "config.prefetch_batches")
_HOST_DELAY_MS = flags.DEFINE_float("host_delay_ms", 0.0, "extra host time per batch: a slow "
                                    "host, to see that the trace shows the device waiting")
# Ops closer than this belong to one stretch of device work (thunk dispatch gaps).
_SAME_STEP_GAP_US = 5_000.0
_XLA_THREAD_PREFIXES = ("tf_XLAPjRtCpuClient", "tf_XLAEigen", "tf_XLA")


def _delayed(batches, seconds: float):
    for batch in batches:
        time.sleep(seconds)
        yield batch


class _NeverPreempted:
    def stop_after_step(self) -> bool:
        return False


def _busy_stretches(trace_dir: str) -> list[tuple[float, float]]:
    """(start, end) microseconds of XLA op events merged where under 5 ms apart."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True))[-1]
    with gzip.open(path) as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    xla_threads = {(e["pid"], e["tid"]) for e in events
                   if e.get("ph") == "M" and e.get("name") == "thread_name"
                   and e["args"]["name"].startswith(_XLA_THREAD_PREFIXES)}
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and (e["pid"], e["tid"]) in xla_threads
                   and not e["name"].startswith("ThreadpoolListener"))
    stretches: list[list[float]] = []
    for start, end in spans:
        if stretches and start - stretches[-1][1] < _SAME_STEP_GAP_US:
            stretches[-1][1] = max(stretches[-1][1], end)
        else:
            stretches.append([start, end])
    return [(start, end) for start, end in stretches]


def main(argv: list[str]) -> None:
    del argv
    from jaxseg import host_memory
    host_memory.use_fast_allocator()
    import jax

    from jaxseg import augment, data, models, parallel, steps, train
    from jaxseg.progress import EpochProgress
    from jaxseg.records import write_records

    size, batch = _IMAGE_SIZE.value, _BATCH_SIZE.value * jax.local_device_count()
    model = models.build_model({"backbone": _BACKBONE.value}, bn_axis_name=parallel.AXIS)
    mesh = parallel.make_mesh()
    compiled = steps.CompiledSteps(model, "dice", mesh)
    state = parallel.replicate(jax.device_get(compiled.create_state(
        models.init_variables(model, seed=0), seed=0)), mesh)
    step_fn = compiled.train(freeze_encoder=False)
    with tempfile.TemporaryDirectory() as directory:
        rng = np.random.default_rng(0)
        write_records(directory, "random", ((rng.integers(0, 256, (size, size, 3), np.uint8),
                                             rng.random((size, size)) > 0.7)
                                            for _ in range(2 * batch)))
        files = data.list_record_files(directory)

        def epoch(index: int, steps_per_epoch: int):
            nonlocal state
            fold_data = data.FoldData(0, files, [], steps_per_epoch, 0, 2 * batch, 0)
            batches = data.train_batches(files, image_size=size, batch_size=batch,
                                         steps=steps_per_epoch, seed=0, epoch=index,
                                         augment_config=augment.default_augment_config())
            batches = _delayed(batches, _HOST_DELAY_MS.value / 1e3)
            state, _ = train.train_epoch(state, step_fn, batches, np.full(steps_per_epoch, 1e-4),
                                         fold_data, index, 2, mesh, "", EpochProgress(),
                                         _NeverPreempted(),
                                         prefetch=_PREFETCH.value,
                                         metrics_every=_METRICS_EVERY.value)
            jax.block_until_ready(state)

        epoch(0, 3)
        trace_dir = tempfile.mkdtemp(prefix="jaxseg-trace-")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            epoch(1, _STEPS.value)
    stretches = _busy_stretches(trace_dir)
    gaps = [start - previous_end for (_, previous_end), (start, _) in
            zip(stretches, stretches[1:])]
    span = stretches[-1][1] - stretches[0][0]
    print(json.dumps({
        "backbone": _BACKBONE.value, "image_size": size, "global_batch": batch,
        "metrics_every": _METRICS_EVERY.value, "prefetch": _PREFETCH.value,
        "host_delay_ms": _HOST_DELAY_MS.value,
        "cpu_cores": len(os.sched_getaffinity(0)), "traced_steps": _STEPS.value,
        "traced_seconds": round(span / 1e6, 2),
        "seconds_per_step": round(span / 1e6 / _STEPS.value, 3),
        "idle_gaps_over_5ms": len(gaps),
        "max_gap_ms": round(max(gaps, default=0.0) / 1e3, 2),
        "device_idle_fraction": round(sum(gaps) / span, 4),
    }))

if __name__ == "__main__":
    app.run(main)
