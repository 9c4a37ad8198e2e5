"""Train step time of 1 process x 8 CPU devices against 2 processes x 4, and how much of
the 2x4 step its collectives take.

`PYTHONPATH=. python benchmarks/distributed_step.py [--image_size=64] [--steps=10]`

Each layout runs as its own processes (joined over localhost with gloo, as the tests do).
It times the real data-parallel train step (B0, global batch 8), then a program that does
only the step's cross-device sums: one psum over a tree shaped like the parameters (the
gradients), which is most of what the step all-reduces (`allreduce_bytes.py`). The
collective share is that program's time over the step's time.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                               f"{8 // args.num_processes}")
    import jax
    import numpy as np

    from jaxseg import colour, models, parallel, processes, steps, train  # noqa: E402
    from jaxseg.configs import cpu as cpu_config

    if args.num_processes > 1:
        processes.join(f"localhost:{args.port}", args.num_processes, args.process_id)
    config = cpu_config.get_config()
    mesh = parallel.make_mesh()
    model = models.build_model(config, bn_axis_name=parallel.AXIS)
    compiled = steps.CompiledSteps(model, config.loss, mesh)
    variables = train.initial_variables(model, 0, None)
    state = parallel.replicate(jax.device_get(compiled.create_state(variables, seed=0)), mesh)
    rng = np.random.default_rng(args.process_id)
    local = jax.local_device_count()
    batch = parallel.to_global_batch({
        "image": rng.integers(0, 256, (local, args.image_size, args.image_size, 3), np.uint8),
        "mask": (rng.uniform(size=(local, args.image_size, args.image_size, 1)) > 0.8).astype(
            np.uint8),
        # The recipe's colour ops drawn, as the default augmentation sends them.
        "colour_factors": np.concatenate([
            1.0 + rng.uniform(-0.1, 0.1, (local, colour.HUE)),
            np.tile(colour.IDENTITY[colour.HUE:], (local, 1))], axis=1).astype(np.float32)},
        mesh)
    step = compiled.train(freeze_encoder=False)
    learning_rate = np.float32(1e-3)

    def time_step() -> float:
        nonlocal state
        started = time.perf_counter()
        state, metrics = step(state, batch, learning_rate)
        jax.block_until_ready(metrics)
        return time.perf_counter() - started

    gradient_sum = parallel.data_parallel(
        lambda params: jax.tree.map(lambda x: jax.lax.psum(x, parallel.AXIS), params), mesh,
        num_args=1, batch_args=())
    params = parallel.replicate(variables["params"], mesh)

    def time_sum() -> float:
        started = time.perf_counter()
        jax.block_until_ready(gradient_sum(params))
        return time.perf_counter() - started

    compile_started = time.perf_counter()
    time_step(), time_sum()
    compile_s = time.perf_counter() - compile_started
    time_step(), time_sum()  # warm
    step_times = [time_step() for _ in range(args.steps)]
    sum_times = [time_sum() for _ in range(args.steps)]
    if processes.is_main():
        print(json.dumps({
            "layout": f"{args.num_processes}x{8 // args.num_processes}",
            "first_calls_s": round(compile_s, 1),
            "step_s_median": round(float(np.median(step_times)), 3),
            "step_s_min": round(min(step_times), 3),
            "gradient_psum_s_median": round(float(np.median(sum_times)), 4),
            "collective_share": round(float(np.median(sum_times) / np.median(step_times)), 3),
        }), flush=True)


def launch(num_processes: int, args: argparse.Namespace) -> dict:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, __file__, "--worker", f"--num_processes={num_processes}",
               f"--port={port}", f"--image_size={args.image_size}", f"--steps={args.steps}"]
    started = [subprocess.Popen([*command, f"--process_id={index}"],
                                stdout=subprocess.PIPE if index == 0 else subprocess.DEVNULL,
                                text=True) for index in range(num_processes)]
    output = started[0].communicate()[0]
    if any(process.wait() for process in started):
        raise SystemExit(f"the {num_processes}-process run failed")
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num_processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for num_processes in (1, 2):
        print(json.dumps(launch(num_processes, args)), flush=True)


if __name__ == "__main__":
    main()
