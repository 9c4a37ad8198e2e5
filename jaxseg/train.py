"""The recipe's K-fold training.

    python -m jaxseg.train --config=b5 --config.data_dir=TILES_DIR --workdir=RUN

One fold = fresh model -> epochs of (train, validate, callbacks, checkpoints) -> best
model, history and curves. A fold whose `result.json` exists is finished and skipped;
an unfinished one resumes from its latest checkpoint, so re-running the same command
after a kill loses at most the epoch in progress, and after a preemption notice
(SIGTERM), which stops the run at the end of a step, at most that step.

Several processes (hosts of a pod slice, or CPU processes) run the same command with
`--coordinator_address`, `--num_processes` and `--process_id`; process 0 decides what
files say and speaks for the run (`processes`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import flags
from tqdm import tqdm

from jaxseg import (checkpoints, cli, compile_cache, config_checks, convert, data, host_memory,
                    locking, models, parallel, paths, precise_bn, processes, reporting, run_files,
                    schedules, slide_validation, steps, thresholds)
from jaxseg.callbacks import EarlyStopping, ReduceLROnPlateau
from jaxseg.progress import EpochProgress, FoldProgress

def last_good_checkpoint(epochs_done: int, fold_dir: paths.Path) -> str:
    if epochs_done == 0:
        return "no epoch of this fold had finished, so nothing was saved"
    return f"the checkpoint of epoch {epochs_done} stays in {fold_dir / 'latest'}"


def raise_if_not_finite(values: dict[str, float], name: str, where: str,
                        last_good: str) -> None:
    """A diverged run stops before its state reaches a checkpoint: the latest checkpoint
    is saved after validation, which a non-finite loss never passes."""
    if not math.isfinite(values[name]):
        raise cli.Diverged(f"{where}: {name} is {values[name]}; stopped, {last_good}")


class Preempted(Exception):
    """A preemption notice stopped the run after a step whose state is saved."""


def train_epoch(state: steps.TrainState, step_fn: Callable, batches: Iterator,
                learning_rates: np.ndarray, fold_data: data.FoldData, epoch: int, epochs: int,
                mesh, last_good: str, progress: EpochProgress,
                preemption: processes.PreemptionWatch, *, prefetch: int, metrics_every: int,
                first_compile: reporting.FirstCompile | None = None
                ) -> tuple[steps.TrainState, bool]:
    """Runs the epoch's remaining steps, adding them to `progress`; True when a
    preemption notice stopped it after a step (the same step on every process).
    `learning_rates` holds the rate of each of the epoch's steps.

    The host reads the steps' metrics `metrics_every` steps at a time, and only once the
    next step is queued, so it never stalls the devices; a non-finite loss is therefore
    seen up to that many steps late, still before any checkpoint holds its state."""
    first_step = progress.steps_done
    pending: list[dict] = []
    preempted = False
    # The bar is cleared however the epoch ends, so an error line starts a line of its own.
    with tqdm(total=fold_data.steps_per_epoch, initial=progress.steps_done, unit="step",
              leave=False, dynamic_ncols=True,
              desc=f"fold {fold_data.fold} epoch {epoch + 1}/{epochs}",
              disable=not processes.is_main()) as bar:

        def consume(steps_metrics: list[dict]) -> None:
            for metrics in jax.device_get(steps_metrics):
                values = {name: float(value) for name, value in metrics.items()}
                raise_if_not_finite(values, "loss", f"fold {fold_data.fold}, epoch "
                                    f"{epoch + 1}, step {progress.steps_done + 1}", last_good)
                for name, value in values.items():
                    progress.totals[name] += value
                progress.steps_done += 1
            bar.update(len(steps_metrics))
            bar.set_postfix(loss=f"{progress.totals['loss'] / progress.steps_done:.4f}",
                            dice_coe=f"{progress.totals['dice_coe'] / progress.steps_done:.4f}")
            steps_metrics.clear()

        for step, batch in enumerate(parallel.prefetch_to_devices(batches, mesh, prefetch)):
            learning_rate = np.float32(learning_rates[first_step + step])
            if first_compile is not None:
                first_compile.compile(step_fn, state, batch, learning_rate)
            state, metrics = step_fn(state, batch, learning_rate)
            if step == 0 and host_memory.keeps_freed_memory():
                jax.block_until_ready(metrics)  # the step's buffers, allocated once
                host_memory.fall_back_if_crowded()
            if len(pending) >= metrics_every:
                consume(pending)  # the steps before the one just queued
            pending.append(metrics)
            if preemption.stop_after_step():
                preempted = True
                break
        if pending:
            consume(pending)
    return state, preempted


def validate(variables: dict, eval_fn: Callable, batches: Iterator, mesh, *, prefetch: int,
             metrics_every: int, num_batches: int | None = None
             ) -> tuple[dict[str, float], tuple[dict, jax.Array] | None]:
    """Epoch validation metrics: batch values weighted by their real examples (the last
    batch is padded), and the competition's per-image Dice over every example; and the
    first batch with its predicted probabilities, still on the devices (None without).

    As in training, the host reads the batches' metrics back `metrics_every` at a time,
    once the next batch is queued, and shows them on a progress bar."""
    weighted = {"val_loss": 0.0, "val_dice_coe": 0.0, "val_accuracy": 0.0}
    dice_sum = examples = 0.0
    read: list[dict] = []
    with tqdm(total=num_batches, unit="batch", leave=False, dynamic_ncols=True,
              desc="validation", disable=not processes.is_main()) as bar:
        pending: list = []
        first_batch = None
        for batch in parallel.prefetch_to_devices(batches, mesh, prefetch):
            metrics, probabilities = eval_fn(variables, batch)
            first_batch = first_batch or (batch, probabilities)
            if len(pending) >= metrics_every:
                read += jax.device_get(pending)
                bar.update(len(pending))
                pending.clear()
            pending.append(metrics)
        read += jax.device_get(pending)
    for metrics in read:
        count = float(metrics["num_images"])
        if count == 0:
            continue
        weighted["val_loss"] += float(metrics["loss"]) * count
        weighted["val_dice_coe"] += float(metrics["dice_coe"]) * count
        weighted["val_accuracy"] += float(metrics["accuracy"]) * count
        dice_sum += float(metrics["per_image_dice_sum"])
        examples += count
    if examples == 0:
        raise cli.InputError("validation files hold no examples")
    result = {name: value / examples for name, value in weighted.items()}
    result["val_per_image_dice"] = dice_sum / examples
    result["num_val_examples"] = int(examples)
    return result, first_batch


def validation_batches(config: ml_collections.ConfigDict, fold_data: data.FoldData
                       ) -> Iterator[dict]:
    """This process's share of the fold's validation tiles, every process running the
    same number of batches."""
    return data.validation_batches(
        fold_data.val_files, image_size=config.image_size,
        batch_size=parallel.host_batch_size(config.per_device_batch_size),
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_batches=fold_data.val_batches, global_order=config.deterministic)


def fold_seed(config: ml_collections.ConfigDict, fold: int) -> int:
    """Each fold's model initialisation and data order, apart from the other folds'."""
    return config.seed + 1000 * fold


def start_fold(config: ml_collections.ConfigDict, fold: int, ckpt: checkpoints.FoldCheckpoints,
               model: models.Unet, compiled: steps.CompiledSteps, init_weights: dict | None
               ) -> tuple[steps.TrainState, FoldProgress]:
    """A fresh model (as the recipe rebuilds it for each fold: the converted weights,
    else random ones) and progress, or the state and progress the previous attempt left."""
    seed = fold_seed(config, fold)
    host_state = jax.device_get(compiled.create_state(
        models.init_variables(model, seed) if init_weights is None else init_weights,
        seed=seed))
    resume_point = checkpoints.ResumePoint(**processes.decided_by_main(
        lambda: dataclasses.asdict(ckpt.resume_point())))
    restored = ckpt.restore(resume_point, host_state)
    if restored is None:
        return host_state, FoldProgress(lr=config.learning_rate)
    host_state, saved = restored
    progress = FoldProgress.from_json(processes.decided_by_main(lambda: saved),
                                      ckpt.fold_dir / resume_point.kind)
    position = (f"epoch {progress.epochs_done + 1} at step {progress.epoch.steps_done + 1}"
                if progress.epoch.steps_done else f"after epoch {progress.epochs_done}")
    processes.report(f"fold {fold}: resuming {position} (lr {progress.lr:g}, best "
                     f"val_dice_coe {progress.early_stopping.best:.4f})")
    return host_state, progress


@dataclasses.dataclass
class RunContext:
    """What the folds of a run share: programs, devices, starting weights, the clock."""
    model: models.Unet
    compiled: steps.CompiledSteps
    mesh: Any
    init_weights: dict | None
    preemption: processes.PreemptionWatch
    clock: reporting.RunClock
    first_compile: reporting.FirstCompile
    slide_validation: slide_validation.SlideValidation | None = None


def train_fold(config: ml_collections.ConfigDict, workdir: paths.Path, fold_data: data.FoldData,
               run: RunContext) -> dict:
    fold, fold_dir = fold_data.fold, workdir / f"fold_{fold_data.fold}"
    compiled, mesh = run.compiled, run.mesh
    is_main = processes.is_main()
    if is_main:
        run_files.write_fold_files(fold_dir, fold_data.train_files, fold_data.val_files)
    fold_started = time.time()
    ckpt = checkpoints.FoldCheckpoints(fold_dir)
    host_state, progress = start_fold(config, fold, ckpt, run.model, compiled,
                                      run.init_weights)
    run.clock.skip(progress.epochs_done)
    attempt_started = fold_started - progress.elapsed_s
    plateau = ReduceLROnPlateau(factor=config.plateau_factor, patience=config.plateau_patience,
                                min_lr=config.min_learning_rate,
                                min_delta=config.plateau_min_delta, state=progress.plateau)
    early_stopping = EarlyStopping(patience=config.early_stopping_patience,
                                   state=progress.early_stopping)
    monitor = slide_validation.monitored_metric(config)
    if run.slide_validation is not None:
        progress.history.setdefault(slide_validation.METRIC, [])

    def saved_progress() -> dict:
        progress.elapsed_s = time.time() - attempt_started
        return progress.to_json()

    state = parallel.replicate(host_state, mesh)
    tensorboard = reporting.TensorBoardLog(fold_dir / "tensorboard") if is_main else None

    # The epochs. Checkpoints in flight are finished even when an epoch fails, so the
    # last good state is on disk before the error reaches the user.
    host_batch = parallel.host_batch_size(config.per_device_batch_size)
    try:
        while progress.epochs_done < config.epochs and not progress.stopped:
            epoch = progress.epochs_done
            learning_rates = schedules.epoch_learning_rates(
                config, epoch, fold_data.steps_per_epoch, progress.lr)
            lr = float(learning_rates[0])  # the epoch's, in its history and report lines
            epoch_started = time.time()
            last_good = last_good_checkpoint(epoch, fold_dir)
            # A preemption after an epoch's last step leaves only its validation to do.
            batches = iter(()) if progress.epoch.steps_done == fold_data.steps_per_epoch else (
                data.train_batches(
                    fold_data.train_files, image_size=config.image_size,
                    batch_size=host_batch, steps=fold_data.steps_per_epoch,
                    seed=fold_seed(config, fold),
                    epoch=epoch, augment_config=config.augment,
                    shuffle_buffer=config.shuffle_buffer, deterministic=config.deterministic,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    steps_done=progress.epoch.steps_done))
            freeze_encoder = epoch < config.encoder_freeze_epochs
            step_fn = compiled.train(freeze_encoder=freeze_encoder)
            steps_before, train_started = progress.epoch.steps_done, time.time()
            state, preempted = train_epoch(state, step_fn, batches, learning_rates, fold_data,
                                           epoch, config.epochs, mesh, last_good, progress.epoch,
                                           run.preemption, prefetch=config.prefetch_batches,
                                           metrics_every=config.metrics_every_steps,
                                           first_compile=run.first_compile)
            images_per_s = ((progress.epoch.steps_done - steps_before) * host_batch
                            * jax.process_count()
                            / max(time.time() - train_started
                                  - run.first_compile.take_seconds(), 1e-6))
            if preempted:
                ckpt.save_preempted(epoch * fold_data.steps_per_epoch
                                    + progress.epoch.steps_done, state, saved_progress())
                raise Preempted(f"preempted at fold {fold} epoch {epoch + 1} step "
                                f"{progress.epoch.steps_done}; run the same command to resume")
            train_metrics = progress.epoch.means(fold_data.steps_per_epoch)
            progress.epoch = EpochProgress()
            if config.precise_bn_batches:
                state = precise_bn.recompute(state, compiled, config, fold_data.train_files,
                                             seed=fold_seed(config, fold), epoch=epoch,
                                             freeze_encoder=freeze_encoder, mesh=mesh)
            val_metrics, val_batch = validate(
                state.variables, compiled.eval, validation_batches(config, fold_data), mesh,
                prefetch=config.prefetch_batches, metrics_every=config.metrics_every_steps,
                num_batches=fold_data.val_batches)
            raise_if_not_finite(val_metrics, "val_loss",
                                f"fold {fold}, epoch {epoch + 1}, validation", last_good)
            progress.num_val_examples = val_metrics.pop("num_val_examples")
            if progress.num_val_examples != fold_data.num_val_examples:
                # TFRecord files cut at a record boundary read cleanly, only shorter.
                raise cli.InputError(f"{', '.join(fold_data.val_files)}: "
                                     f"{progress.num_val_examples} examples read, the file "
                                     f"names promise {fold_data.num_val_examples}; is a file "
                                     "truncated?")
            if run.slide_validation is not None:
                val_metrics[slide_validation.METRIC] = run.slide_validation.score(
                    state.variables, slide_validation.slide_ids(fold_data.val_files))
            logs = {"epoch": epoch + 1, **train_metrics, **val_metrics, "lr": lr}
            for key, values in progress.history.items():
                values.append(logs[key])
            if is_main:
                run_files.write_fold_history(fold_dir, progress.history, fold)
            run.clock.epoch_done(time.time() - epoch_started)
            if config.lr_schedule == "plateau":
                progress.lr = plateau.update(logs["val_loss"], lr)
            else:  # the rate the next epoch starts at, for the reports
                progress.lr = schedules.cosine_rate(
                    config, (epoch + 1) * fold_data.steps_per_epoch, fold_data.steps_per_epoch)
            improved, progress.stopped = early_stopping.update(epoch, logs[monitor])
            if improved:
                ckpt.save_best(epoch, state.variables, {
                    **{key: logs[key] for key in val_metrics},
                    "num_val_examples": progress.num_val_examples})
            if progress.stopped:
                run.clock.skip(config.epochs - epoch - 1)
            processes.report(
                f"fold {fold} epoch {epoch + 1}/{config.epochs} "
                f"{time.time() - epoch_started:.0f}s - loss {logs['loss']:.4f} - dice_coe "
                f"{logs['dice_coe']:.4f} - val_loss {logs['val_loss']:.4f} - val_dice_coe "
                f"{logs['val_dice_coe']:.4f} - val_per_image_dice "
                f"{logs['val_per_image_dice']:.4f}"
                + (f" - {slide_validation.METRIC} {logs[slide_validation.METRIC]:.4f}"
                   if run.slide_validation is not None else "")
                + f" - lr {lr:.3g}"
                + (" *best*" if improved else "")
                + (f" -> lr {progress.lr:.3g}" if progress.lr != lr else "")
                + f" - {images_per_s:.1f} img/s - "
                + run.clock.time_left(0 if progress.stopped else config.epochs - epoch - 1))
            if tensorboard is not None:
                tensorboard.write(
                    epoch + 1, {**{k: v for k, v in logs.items() if k != "epoch"},
                                "images_per_second": images_per_s},
                    {"validation": reporting.prediction_panels(
                        *val_batch, config.tensorboard_images)}
                    if val_batch and config.tensorboard_images else None)
            progress.epochs_done = epoch + 1
            ckpt.save_latest(progress.epochs_done, state, saved_progress())
            if progress.stopped:
                processes.report(f"fold {fold}: early stopping after epoch {epoch + 1}; best "
                                 f"epoch {progress.early_stopping.best_epoch + 1}")
            host_memory.release_freed_memory()
    finally:
        ckpt.close()
        if tensorboard is not None:
            tensorboard.close()

    best_variables = parallel.replicate(checkpoints.load_best_variables(fold_dir), mesh)
    threshold = thresholds.choose(
        best_variables, compiled.eval, validation_batches(config, fold_data), mesh,
        prefetch=config.prefetch_batches)
    processes.report(f"fold {fold}: best epoch {progress.early_stopping.best_epoch + 1} "
                     f"segments its validation tiles best at threshold "
                     f"{threshold['threshold']:g}")
    result = {**fold_result(fold_data, progress, time.time() - attempt_started, monitor),
              **threshold}
    if is_main:
        run_files.write_fold_result(fold_dir, progress.history, result)
    return result


def fold_result(fold_data: data.FoldData, progress: FoldProgress, elapsed_s: float,
                monitor: str) -> dict:
    """The best epoch by `monitor` is the fold's model (EarlyStopping
    restore_best_weights)."""
    best, history = progress.early_stopping.best_epoch, progress.history
    slide_dice = history.get(slide_validation.METRIC)
    return {
        "fold": fold_data.fold, "best_epoch": best + 1, "monitor": monitor,
        "best_val_dice_coe": history["val_dice_coe"][best],
        **({f"best_{slide_validation.METRIC}": slide_dice[best]} if slide_dice else {}),
        "val_per_image_dice": history["val_per_image_dice"][best],
        "val_loss": history["val_loss"][best],
        "num_val_examples": progress.num_val_examples,
        "epochs_run": len(history["epoch"]), "stopped_early": progress.stopped,
        "num_train_examples": fold_data.num_train_examples,
        "steps_per_epoch": fold_data.steps_per_epoch,
        "train_files": fold_data.train_files, "val_files": fold_data.val_files,
        "time_s": round(elapsed_s, 1),
    }


def train_folds(config: ml_collections.ConfigDict, workdir: paths.Path, plans: list[data.FoldData],
                init_weights: dict | None,
                validation_slides: slide_validation.Sources | None = None) -> dict[int, dict]:
    """Each planned fold's result; a fold whose `result.json` exists is not trained again."""
    mesh = parallel.make_mesh()
    model = models.build_model(config, bn_axis_name=parallel.AXIS)
    compiled = steps.CompiledSteps(model, config.loss, mesh, config.ema_decay)
    results = {}
    step_key = (f"train step {config.backbone} {config.image_size}px "
                f"{config.per_device_batch_size}x{jax.device_count()} {jax.devices()[0].platform}"
                f"{' bf16' if config.half_precision else ''}{' ema' if config.ema_decay else ''}"
                f" remat={config.remat} jax {jax.__version__}")
    with processes.PreemptionWatch(mesh) as preemption:
        run = RunContext(model, compiled, mesh, init_weights, preemption,
                         reporting.RunClock(config.epochs * len(plans)),
                         reporting.FirstCompile("train step", step_key, processes.report,
                                                remember=processes.is_main()),
                         None if validation_slides is None else
                         slide_validation.SlideValidation(config, model, validation_slides))
        for plan in plans:
            fold_dir = workdir / f"fold_{plan.fold}"
            finished = processes.decided_by_main(
                lambda: run_files.finished_fold_result(fold_dir))
            if finished is not None:
                run.clock.skip(config.epochs)
                results[plan.fold] = finished
                processes.report(f"fold {plan.fold}: finished earlier, best val_dice_coe "
                                 f"{finished['best_val_dice_coe']:.4f}")
                continue
            processes.report(
                f"fold {plan.fold}: {len(plan.train_files)} training files "
                f"({plan.num_train_examples} images, {plan.steps_per_epoch} steps/epoch), "
                f"{len(plan.val_files)} validation files")
            results[plan.fold] = train_fold(config, workdir, plan, run)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains the chosen folds into `workdir` and returns (and writes) `summary.json`.

    Everything that can be checked without training (config, record files, folds,
    `init_from`) is checked before the workdir is touched. A workdir this call created
    is removed again if the run fails before any fold saved a checkpoint, so a failed
    first attempt leaves nothing behind that a corrected rerun would trip over.
    """
    started = time.time()
    workdir = paths.path(workdir)
    config_checks.check_train_config(config)

    def check_files() -> tuple[list[str], dict[str, int], bool]:
        config_checks.check_workdir_config(config, workdir)
        files = data.list_record_files(config.data_dir)
        data.check_record_files(files, config.image_size)
        return files, data.checked_counts(files, config.data_dir), workdir.exists()

    files, counts, existed = processes.decided_by_main(check_files)
    splits = data.kfold_splits(files, config.num_folds, config.seed)
    folds = config_checks.chosen_folds(config)
    plans = [data.fold_plan(config, fold, *splits[fold], counts) for fold in folds]
    validation_slides = None if not config.val_images else slide_validation.Sources(
        **processes.decided_by_main(lambda: dataclasses.asdict(slide_validation.Sources.find(
            config, [plan.val_files for plan in plans]))))
    init_weights = convert.load_init_weights(config)
    is_main = processes.is_main()
    # Process 0 holds the workdir for the run; the others write nothing of their own.
    with locking.hold(workdir, "a training run") if is_main else contextlib.nullcontext():
        try:
            if is_main:
                run_files.write_run_files(workdir, config)
            processes.report(
                f"{len(files)} record files, folds {folds}, {jax.device_count()} devices "
                f"({jax.devices()[0].platform}) in {jax.process_count()} process(es), global "
                f"batch {config.per_device_batch_size * jax.device_count()}")
            with reporting.compile_log() as compile_seconds:
                results = train_folds(config, workdir, plans, init_weights, validation_slides)
        except BaseException:
            if is_main and not existed and not run_files.holds_progress(workdir):
                with contextlib.suppress(OSError):
                    workdir.rmtree()
            raise

        summary = run_files.run_summary(results, time.time() - started, compile_seconds)
        if is_main:
            reporting.write_json(workdir / "summary.json", summary)
    processes.report(run_files.summary_line(summary, workdir / "summary.json"))
    return summary


def define_flags() -> None:
    cli.define_config_flag("config", "Training config: a packaged config's name ("
                           + ", ".join(cli.packaged_configs())
                           + ") or a config file, path/to/file.py[:argument].")
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed if present).")
    processes.define_flags()
    compile_cache.define_flags()


def main() -> None:
    options = flags.FLAGS
    host_memory.use_fast_allocator()
    compile_cache.enable_from_flags()  # first: joining turns it off where it must
    processes.join_from_flags()
    if options.config is None or options.workdir is None:
        raise cli.InputError("both --config=NAME_OR_FILE and --workdir=DIR are required")
    try:
        train_and_evaluate(options.config, options.workdir)
    except Preempted as preempted:
        # Exit status 0: the run did what was asked of it so far, and schedulers
        # restart a preempted job by running the same command again.
        processes.report(str(preempted))


def run() -> None:
    """Where `python -m jaxseg.train` and the console script `jaxseg-train` start, so
    both parse the same flags and report errors alike."""
    define_flags()
    cli.run_main(main)


if __name__ == "__main__":
    run()
