"""Training and inference throughput of jaxseg beside the recipe it replaces, on one machine.

    python benchmarks/train_speed.py                        # Unet-efficientnetb0, 256 px
    python benchmarks/train_speed.py --backbone=efficientnetb5 --image_size=512 --rounds=3
    python benchmarks/train_speed.py --frameworks=jaxseg,smp --steps_per_round=10   # GPU

All sides train the same Unet (random weights) with Adam and soft Dice on one fixed random
batch, and predict batches of the same size:
- jaxseg runs the program training runs (`steps.CompiledSteps`: `steps.train_step` under
  `parallel.data_parallel` on every local device) and `predict.make_batch_predictor`;
- keras runs segmentation_models' Unet compiled as the recipe compiles it (Adam,
  `sm.losses.DiceLoss()`, the recipe's dice_coe and accuracy metrics), with
  `train_on_batch` and `predict` (float32 only);
- smp runs segmentation_models_pytorch's Unet (encoder 'efficientnet-bN', the same
  architecture) with torch Adam and `smp.losses.DiceLoss('binary')`, on CUDA when there
  is one, bfloat16 through autocast with --half_precision, eagerly or (--torch_compile)
  through torch.compile.

Each framework lives in its own subprocess (their thread pools would compete inside one
process, and each process's peak memory is then its own). All are built, compiled and
warmed up first; then the parent asks them for one round at a time, in turn, so that
whatever else runs on the machine weighs on all alike (with --sequential, one framework's
process runs and ends before the next starts). A round is --steps_per_round steps
and one wait for the result (on a GPU one step per wait would time the host's round trip
too). Throughputs come from the median round; ratios are jaxseg over each other framework.

Model FLOPs are XLA's count for the forward pass of jaxseg's Unet with native layers
(train = 3x forward, the usual convention, so rematerialised work does not count); with
--peak_tflops the report gives each framework's model FLOP utilisation against that peak.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
from absl import app, flags

from jaxseg import host_memory

FRAMEWORKS = ("jaxseg", "keras", "smp")
TASKS = ("train", "predict")
_REPLY = "REPLY "

_FRAMEWORKS = flags.DEFINE_list("frameworks", ["jaxseg", "keras"], f"some of {FRAMEWORKS}")
_BACKBONE = flags.DEFINE_string("backbone", "efficientnetb0", "EfficientNet variant")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "square input side in pixels")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "global batch (split over jax devices)")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "steps of each task before timing")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "timed rounds of each task and framework, taken "
                               "in turn")
_STEPS_PER_ROUND = flags.DEFINE_integer("steps_per_round", 1, "steps per timed round")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "what to time")
_CONV_IMPL = flags.DEFINE_string("conv_impl", "auto", "jaxseg Unet conv_impl")
_DEPTHWISE_IMPL = flags.DEFINE_string("depthwise_impl", "auto", "jaxseg Unet depthwise_impl")
_UPSAMPLE_IMPL = flags.DEFINE_string("upsample_impl", "auto", "jaxseg Unet upsample_impl")
_BATCHNORM_IMPL = flags.DEFINE_string("batchnorm_impl", "auto", "jaxseg Unet batchnorm_impl")
_REMAT = flags.DEFINE_enum("remat", "auto", ["auto", "true", "false"], "jaxseg Unet remat")
_HALF_PRECISION = flags.DEFINE_boolean("half_precision", False,
                                       "bfloat16 compute (jaxseg dtype, smp autocast)")
_CHANNELS_LAST = flags.DEFINE_boolean("channels_last", True, "smp: channels_last memory "
                                      "format (PyTorch's advice for convolutions on GPU)")
_TORCH_COMPILE = flags.DEFINE_boolean("torch_compile", False, "smp: run the model through "
                                     "torch.compile (the warm-up steps compile it)")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "the machine's peak for the dtype "
                                  "used, to report model FLOP utilisation")
_JSON_OUT = flags.DEFINE_string("json_out", None, "also write the results to this file")
_PAUSE_SECONDS = flags.DEFINE_float("pause_seconds", 2.0, "idle time before each round: "
                                    "the thread pools of the framework that ran last stop "
                                    "spinning before the next is timed")
_SEQUENTIAL = flags.DEFINE_boolean("sequential", False, "time one framework after the "
                                    "other instead of in turn, for models whose processes "
                                    "do not fit in memory together (B5 at 512 px in 24 GB)")
_WORKER = flags.DEFINE_enum("worker", None, FRAMEWORKS, "internal: serve one framework's "
                            "steps on stdin/stdout")
# A share of one core taken by other processes above which the timings are not trusted.
_OTHER_LOAD_WARNING = 0.05
_WORKER_FLAGS = ("backbone", "image_size", "batch_size", "warmup_steps", "steps_per_round",
                 "tasks", "conv_impl", "depthwise_impl", "upsample_impl", "batchnorm_impl", "remat",
                 "half_precision", "channels_last", "torch_compile")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _random_batch(batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, size, size, 3)).astype(np.float32)
    masks = (rng.random((batch_size, size, size, 1)) < 0.3).astype(np.float32)
    return images, masks


def _jaxseg_tasks() -> tuple[dict[str, Callable], Callable[[], None], dict]:
    """(task -> callable launching one step, wait for the last step, setup facts)."""
    import functools

    allocator = host_memory.use_fast_allocator()  # as `jaxseg.train` does (preloaded: _Worker)
    import jax

    from jaxseg import colour, ensembles, models, parallel, predict, steps

    config = {"backbone": _BACKBONE.value, "half_precision": _HALF_PRECISION.value,
              "depthwise_impl": _DEPTHWISE_IMPL.value, "conv_impl": _CONV_IMPL.value,
              "upsample_impl": _UPSAMPLE_IMPL.value, "batchnorm_impl": _BATCHNORM_IMPL.value,
              **{"auto": {}, "true": {"remat": True}, "false": {"remat": False}}[_REMAT.value]}
    model = models.build_model(config, bn_axis_name=parallel.AXIS)
    mesh = parallel.make_mesh()
    compiled_steps = steps.CompiledSteps(model, "dice", mesh)
    variables = models.init_variables(model, seed=0)
    state = parallel.replicate(steps.create_train_state(variables, compiled_steps.tx, 0), mesh)
    images, masks = _random_batch(_BATCH_SIZE.value, _IMAGE_SIZE.value)
    # As the train loop sends a batch with the default augmentation: uint8 pixels and
    # masks, the recipe's colour ops drawn (the others, off by default, cost nothing).
    factors = np.array(colour.IDENTITY, np.float32)
    factors[:colour.HUE] += np.float32(0.05)
    batch = parallel.to_global_batch(
        {"image": images.astype(np.uint8), "mask": masks.astype(np.uint8),
         "colour_factors": np.tile(factors, (len(images), 1))}, mesh)
    learning_rate = np.float32(1e-4)

    facts = {"devices": f"{jax.local_device_count()} x {jax.devices()[0].device_kind}",
             "allocator": allocator}
    if "train" in _TASKS.value:  # a B5 train step takes minutes to compile on a GPU
        start = time.perf_counter()
        compiled_steps.train(freeze_encoder=False).lower(state, batch, learning_rate).compile()
        facts["compile_seconds"] = time.perf_counter() - start
        step = compiled_steps.train(freeze_encoder=False)  # training's own call: jit's cache
    # The native layers' count (the CPU paths skip work: folded upsampling), lowered for
    # the CPU, which counts without compiling (a GPU client counts compiled programs only).
    native = models.build_model({**config, **dict.fromkeys(models.IMPL_FIELDS, "native")})
    with jax.default_device(jax.devices("cpu")[0]):
        forward = jax.jit(functools.partial(native.apply, train=False)).lower(
            variables, np.zeros((1, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), np.float32))
    cost = forward.cost_analysis()
    facts["forward_gflop_per_image"] = cost["flops"] / 1e9 if cost else None

    ensemble = ensembles.Ensemble(model, [variables], _IMAGE_SIZE.value, 1, "benchmark")
    predict_fn, _ = predict.make_batch_predictor(
        ensemble, "none", _BATCH_SIZE.value // jax.local_device_count())
    windows = images.astype(np.uint8)
    last = {}
    first_step_pending = set(TASKS)

    def train_step() -> None:
        nonlocal state
        state, last["train"] = step(state, batch, learning_rate)

    def wait() -> None:
        ran = set(last)
        if "train" in last:
            loss = float(last.pop("train")["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"jaxseg loss is {loss}")
        if "predict" in last:
            jax.block_until_ready(last.pop("predict"))
        if ran & first_step_pending:  # as jaxseg.train and jaxseg.predict do after a first step
            first_step_pending.difference_update(ran)
            if host_memory.fall_back_if_crowded():
                facts["allocator"] = "glibc (crowded: fell back from glibc-tuned)"

    def device_peak() -> None:
        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            facts["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20

    return {"train": train_step,
            "predict": lambda: last.__setitem__("predict", predict_fn(windows))}, \
        lambda: (wait(), device_peak()), facts


def _keras_tasks() -> tuple[dict[str, Callable], Callable[[], None], dict]:
    if _HALF_PRECISION.value:
        raise app.UsageError("--half_precision: the keras side runs float32 only")
    import keras_recipe

    model = keras_recipe.compiled_unet(_BACKBONE.value, seed=0, learning_rate=1e-4)
    images, masks = _random_batch(_BATCH_SIZE.value, _IMAGE_SIZE.value)
    start = time.perf_counter()
    model.train_on_batch(images, masks)
    facts = {"first_step_seconds": time.perf_counter() - start}
    return {"train": lambda: model.train_on_batch(images, masks),
            "predict": lambda: model.predict(images, batch_size=_BATCH_SIZE.value,
                                             verbose=0)}, lambda: None, facts


def _smp_tasks() -> tuple[dict[str, Callable], Callable[[], None], dict]:
    import segmentation_models_pytorch as smp
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory_format = torch.channels_last if _CHANNELS_LAST.value else torch.contiguous_format
    torch.manual_seed(0)
    model = smp.Unet(_BACKBONE.value.replace("efficientnetb", "efficientnet-b"),
                     encoder_weights=None, classes=1)
    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    forward = torch.compile(model) if _TORCH_COMPILE.value else model
    loss_fn = smp.losses.DiceLoss("binary", from_logits=True)
    images, masks = _random_batch(_BATCH_SIZE.value, _IMAGE_SIZE.value)
    windows = images.astype(np.uint8)

    def to_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device).permute(0, 3, 1, 2).contiguous(
            memory_format=memory_format)

    image_batch, mask_batch = to_device(images), to_device(masks)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=_HALF_PRECISION.value)
    last = {}

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(image_batch)
        loss = loss_fn(logits.float(), mask_batch)
        loss.backward()
        optimizer.step()
        last["train"] = loss.detach()

    @torch.inference_mode()
    def predict_step() -> None:
        model.eval()
        with autocast:
            last["predict"] = torch.sigmoid(forward(to_device(windows).float()))

    facts = {"devices": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "smp": smp.__version__,
             "torch_compile": _TORCH_COMPILE.value}

    def wait() -> None:
        if "train" in last and not np.isfinite(float(last.pop("train"))):
            raise FloatingPointError("smp loss is not finite")
        last.pop("predict", None)
        if device.type == "cuda":
            torch.cuda.synchronize()
            facts["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20

    return {"train": train_step, "predict": predict_step}, wait, facts


def _serve() -> None:
    """Sets up, warms up, then times one round per request line until stdin closes."""
    build = {"jaxseg": _jaxseg_tasks, "keras": _keras_tasks, "smp": _smp_tasks}[_WORKER.value]
    tasks, wait, facts = build()
    for name in _TASKS.value:
        for _ in range(_WARMUP_STEPS.value):
            tasks[name]()
            wait()
        facts[f"{name}_peak_rss_mib"] = _peak_rss_mib()
    print(_REPLY + json.dumps(facts), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        for _ in range(_STEPS_PER_ROUND.value):
            tasks[line.strip()]()
        wait()
        print(_REPLY + json.dumps((time.perf_counter() - start) / _STEPS_PER_ROUND.value),
              flush=True)
    print(_REPLY + json.dumps(facts), flush=True)


class _Worker:
    """One framework's subprocess, answering a round at a time."""

    def __init__(self, framework: str):
        self.framework = framework
        args = [flags.FLAGS[name].serialize() for name in _WORKER_FLAGS]
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={framework}", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                 # jaxseg under the allocator its commands put in force; the others as
                 # their users run them
                 **(host_memory.preload_environment() if framework == "jaxseg" else {})})
        self.seconds: dict[str, list[float]] = {task: [] for task in _TASKS.value}
        self.facts = self._reply()

    def _reply(self):
        for line in self.process.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        status = self.process.wait()
        raise RuntimeError(f"{self.framework} worker exited with status {status} "
                           + ("(killed: out of memory?)" if status == -9 else
                              "(its error is above)"))

    def step(self, task: str) -> None:
        try:
            self.process.stdin.write(task + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"{self.framework} worker died with status "
                               f"{self.process.wait()} (killed for memory if -9: try "
                               "--sequential)") from None
        self.seconds[task].append(self._reply())

    def close(self) -> None:
        """Ends the worker, keeping the facts it gathered while timing (device peaks)."""
        try:
            self.process.stdin.close()
            if any(self.seconds.values()) and self.process.poll() is None:
                self.facts = self._reply()
        except (BrokenPipeError, RuntimeError):
            pass  # it died; step() has said so
        self.process.wait()

    def images_per_second(self, task: str) -> float:
        return _BATCH_SIZE.value / statistics.median(self.seconds[task])


def _results(workers: dict[str, _Worker]) -> dict:
    forward_gflop = workers["jaxseg"].facts.get("forward_gflop_per_image") \
        if "jaxseg" in workers else None
    results = {"setup": {name: flags.FLAGS[name].value for name in _WORKER_FLAGS},
               "forward_gflop_per_image": forward_gflop, "frameworks": {}}
    for framework, worker in workers.items():
        entry = {"facts": worker.facts}
        for task in _TASKS.value:
            images_per_second = worker.images_per_second(task)
            entry[task] = {"images_per_second": images_per_second,
                           "seconds_per_step": worker.seconds[task]}
            if forward_gflop:
                tflops = images_per_second * forward_gflop * (3 if task == "train" else 1) / 1e3
                entry[task]["model_tflops"] = tflops
                if _PEAK_TFLOPS.value:
                    entry[task]["mfu"] = tflops / _PEAK_TFLOPS.value
        results["frameworks"][framework] = entry
    if "jaxseg" in workers:
        results["ratios"] = {
            f"jaxseg/{other} {task}": (workers["jaxseg"].images_per_second(task)
                                       / workers[other].images_per_second(task))
            for other in workers if other != "jaxseg" for task in _TASKS.value}
    return results


def _report(results: dict) -> list[str]:
    lines = []
    if results["forward_gflop_per_image"]:
        lines.append(f"model: {results['forward_gflop_per_image']:.1f} GFLOP per image forward "
                     "(XLA's count), train counted as 3x")
    for framework, entry in results["frameworks"].items():
        facts = entry["facts"]
        setup = [f"peak RSS after {task} {facts[f'{task}_peak_rss_mib']:.0f} MiB"
                 for task in _TASKS.value]
        if "compile_seconds" in facts:
            setup.insert(0, f"train-step compile {facts['compile_seconds']:.1f} s")
        elif "first_step_seconds" in facts:
            setup.insert(0, f"first train step {facts['first_step_seconds']:.1f} s")
        if "device_peak_mib" in facts:
            setup.append(f"device peak {facts['device_peak_mib']:.0f} MiB")
        lines.append(f"{framework:6s} on {facts.get('devices', 'cpu')}: {', '.join(setup)}")
        for task in _TASKS.value:
            timing = entry[task]
            steps = ", ".join(f"{s:.3f}" for s in timing["seconds_per_step"])
            utilisation = (f", {timing['model_tflops']:.1f} model TFLOP/s"
                           if "model_tflops" in timing else "")
            if "mfu" in timing:
                utilisation += f" = {100 * timing['mfu']:.1f}% of peak"
            lines.append(f"{framework:6s} {task:7s} {timing['images_per_second']:7.2f} img/s"
                         f"{utilisation} (s/step: {steps})")
    for name, ratio in results.get("ratios", {}).items():
        lines.append(f"ratio {name}: {ratio:.2f}x")
    for framework, error in results["failures"].items():
        lines.append(f"{framework:6s} FAILED: {error}")
    lines.extend(_warnings(results))
    return lines


def _warnings(results: dict) -> list[str]:
    """What makes the numbers above wrong for this machine, said beside them."""
    lines = []
    timing = results["timing"]
    if "other_cpu_seconds" in timing:
        share = timing["other_cpu_seconds"] / max(timing["timed_seconds"], 1e-9)
        lines.append(f"others (processes, a shared host's steal) used "
                     f"{timing['other_cpu_seconds']:.1f} CPU seconds of this benchmark's cores "
                     f"during {timing['timed_seconds']:.0f} s of timing")
        if share > _OTHER_LOAD_WARNING:
            lines.append(f"WARNING: others took {100 * share:.0f}% of a core while timing: "
                         "these numbers are not this machine's; rerun it idle")
    jaxseg_devices = results["frameworks"].get("jaxseg", {}).get("facts", {}).get("devices", "")
    if jaxseg_devices.endswith(" x cpu") and not jaxseg_devices.startswith("1 "):
        lines.append(f"WARNING: jaxseg ran on {jaxseg_devices} devices (XLA_FLAGS="
                     f"{os.environ.get('XLA_FLAGS', '')!r}); one CPU device is faster")
    return lines


def _cpu_seconds(workers: list[_Worker]) -> tuple[float, float] | None:
    """(busy CPU seconds of the cores this process may run on, CPU seconds of this
    process and its workers) from /proc, or None where there is no /proc (macOS)."""
    try:
        cores = {f"cpu{core}" for core in os.sched_getaffinity(0)}
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as stat:
            rows = [line.split() for line in stat if line.split()[0] in cores]
        own = sum(os.times()[:2])
        for worker in workers:
            with open(f"/proc/{worker.process.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after the command name
            own += (int(fields[11]) + int(fields[12])) / tick
    except (AttributeError, OSError):
        return None
    # user, nice, system, irq, softirq, steal: steal is CPU a shared host gave to others.
    busy = sum(int(row[index]) for row in rows for index in (1, 2, 3, 6, 7, 8)) / tick
    return busy, own


def _time_rounds(workers: list[_Worker], timing: dict[str, float]) -> None:
    """Times the rounds; adds to `timing` their wall seconds and, where /proc tells, the
    CPU seconds others took meanwhile on this process's cores: on a 2-core machine
    another job moves the timings by up to 80%, which a load average cannot tell from
    the benchmark's own load. Adds them even when a worker dies midway."""
    before, start = _cpu_seconds(workers), time.perf_counter()
    try:
        for task in _TASKS.value:
            for _ in range(_ROUNDS.value):
                for worker in workers:
                    time.sleep(_PAUSE_SECONDS.value)
                    worker.step(task)
    finally:
        after = _cpu_seconds(workers)
        _add_timing(timing, {"timed_seconds": time.perf_counter() - start})
        if before is not None and after is not None:
            others = (after[0] - before[0]) - (after[1] - before[1])
            _add_timing(timing, {"other_cpu_seconds": max(0.0, others)})


def _add_timing(total: dict[str, float], timing: dict[str, float]) -> None:
    for name, value in timing.items():
        total[name] = total.get(name, 0.0) + value


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        _serve()
        return
    if set(_TASKS.value) - set(TASKS) or not _TASKS.value:
        raise app.UsageError(f"--tasks: expected some of {TASKS}, got {_TASKS.value}")
    if set(_FRAMEWORKS.value) - set(FRAMEWORKS) or not _FRAMEWORKS.value:
        raise app.UsageError(f"--frameworks: expected some of {FRAMEWORKS}, "
                             f"got {_FRAMEWORKS.value}")
    print(f"Unet-{_BACKBONE.value} {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} batch "
          f"{_BATCH_SIZE.value}, {os.cpu_count()} cores; jaxseg conv_impl={_CONV_IMPL.value} "
          f"depthwise_impl={_DEPTHWISE_IMPL.value} upsample_impl={_UPSAMPLE_IMPL.value} "
          f"batchnorm_impl={_BATCHNORM_IMPL.value} "
          f"remat={_REMAT.value} half_precision={_HALF_PRECISION.value}", flush=True)
    workers, failures, timing = {}, {}, {}
    try:
        for framework in _FRAMEWORKS.value:  # one at a time: setup and compilation are timed
            try:
                workers[framework] = _Worker(framework)
                if _SEQUENTIAL.value:
                    _time_rounds([workers[framework]], timing)
                    workers[framework].close()
            except RuntimeError as error:  # reported beside the frameworks that finished
                workers.pop(framework, None)
                failures[framework] = str(error)
        if not _SEQUENTIAL.value:
            try:
                _time_rounds(list(workers.values()), timing)
            except RuntimeError as error:  # a worker died; the others' rounds are kept
                dead = next(name for name, worker in workers.items()
                            if worker.process.poll() is not None)
                workers.pop(dead).close()
                failures[dead] = str(error)
    finally:
        for worker in workers.values():
            worker.close()
    results = _results(workers)
    results["failures"] = failures
    results["timing"] = timing
    print("\n".join(_report(results)))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    app.run(main)
