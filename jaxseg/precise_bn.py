"""Precise BatchNorm: statistics that describe the weights validation scores.

The recipe's BatchNorm layers keep moving averages with momentum 0.99, which take a few
hundred steps to follow the weights; on a small data set (an epoch of a few dozen steps)
validation, and the best checkpoint and plateau and early-stopping decisions that read it,
then score a network whose statistics describe weights long gone. With
`config.precise_bn_batches` = K > 0, before each validation the statistics are computed
afresh over K training batches (no augmentation, weights unchanged, synchronised over all
devices) and replace the moving averages, as pycls' precise BN and Wu & Johnson,
"Rethinking 'Batch' in BatchNorm" (2021), do. Training then continues from them.

With weight EMA the statistics are those of the averaged weights, which validation
scores; training's forward passes use each batch's own statistics, so continuing from
them changes no step, only what the next validation would read were it not recomputed.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxseg import data, parallel, processes, steps


def recompute(state: steps.TrainState, compiled: steps.CompiledSteps,
              config: ml_collections.ConfigDict, train_files: list[str], *, seed: int,
              epoch: int, freeze_encoder: bool, mesh: jax.sharding.Mesh) -> steps.TrainState:
    """`state` with its BatchNorm statistics averaged over `config.precise_bn_batches`
    batches of `train_files` (the epoch's shuffle, seeded by `seed` and `epoch`)."""
    num_batches = config.precise_bn_batches
    unaugmented = ml_collections.ConfigDict(config.augment.to_dict())
    unaugmented.enabled = False
    batches = data.train_batches(
        train_files, image_size=config.image_size,
        batch_size=parallel.host_batch_size(config.per_device_batch_size), steps=num_batches,
        seed=seed, epoch=epoch, augment_config=unaugmented,
        shuffle_buffer=config.shuffle_buffer, deterministic=config.deterministic,
        process_index=jax.process_index(), process_count=jax.process_count())
    statistics_fn = compiled.batch_norm_statistics(freeze_encoder)
    accumulated = parallel.replicate(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                                                  state.batch_stats), mesh)
    share = np.float32(1 / num_batches)
    for index, batch in enumerate(tqdm(
            parallel.prefetch_to_devices(batches, mesh, config.prefetch_batches),
            total=num_batches, unit="batch", leave=False, dynamic_ncols=True,
            desc="BatchNorm statistics", disable=not processes.is_main())):
        accumulated = statistics_fn(state.variables, batch, accumulated, np.int32(index), share)
    if freeze_encoder:  # its statistics are not learnt (sums of shares would round them)
        accumulated = {**accumulated, steps.ENCODER: state.batch_stats[steps.ENCODER]}
    return state.replace(batch_stats=accumulated)
