"""The one place where per-device step code becomes a data-parallel program.

Steps are written in the pmap style (per-device code, collectives over the 'batch'
axis). They run under `jax.shard_map` over a 1-D mesh of every device, compiled by
`jax.jit`, rather than under `jax.pmap`: since JAX 0.8 pmap is itself lowered to
jit(shard_map) and is in maintenance mode, and a mesh of all *global* devices with
batches built by `jax.make_array_from_process_local_data` runs unchanged on one CPU,
a TPU v3-8 or a multi-host pod slice.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh of every device of the run, or of `devices` (this process's own, for work
    that each process does on its own share)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def host_batch_size(per_device_batch_size: int) -> int:
    """Examples each host loads per step: its share of the global batch."""
    if per_device_batch_size < 1:
        raise ValueError(f"per_device_batch_size must be >= 1, got {per_device_batch_size}")
    return per_device_batch_size * jax.local_device_count()


def data_parallel(per_device_fn: Callable, mesh: Mesh, num_args: int,
                  batch_args: tuple[int, ...], donate_args: tuple[int, ...] = (),
                  shard_outputs: bool | tuple[bool, ...] = False) -> Callable:
    """Compiles `per_device_fn` once for all devices.

    Arguments in `batch_args` are split along their leading axis over the mesh; the
    rest are replicated. Outputs are replicated (the step must reduce what it returns
    over `AXIS`, which shard_map's replication check enforces), or where `shard_outputs`
    says so (one flag for the output, or one per element of a returned tuple) stay
    split along the batch like the inputs (per-example predictions). Donated arguments
    (the train state) are updated in place on the devices.
    """
    in_specs = tuple(PartitionSpec(AXIS) if i in batch_args else PartitionSpec()
                     for i in range(num_args))
    out_specs = (tuple(map(_output_spec, shard_outputs)) if isinstance(shard_outputs, tuple)
                 else _output_spec(shard_outputs))
    mapped = jax.shard_map(per_device_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(mapped, donate_argnums=donate_args)


def _output_spec(sharded: bool) -> PartitionSpec:
    return PartitionSpec(AXIS) if sharded else PartitionSpec()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree, the same on every process (one seed, one checkpoint), on
    every device: the train state before the first step.

    Each process fills its own devices. `jax.device_put` would first check, in a
    collective, that every process holds the same values: an all-gather of the whole
    model, which gloo abandons when one process comes more than 30 s after another.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.make_array_from_callback(np.shape(leaf), sharding,
                                                  lambda index: np.asarray(leaf)[index]),
        tree)


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's share into one batch sharded over all devices."""
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    local_devices = len(mesh.local_devices)
    for name, value in local_batch.items():
        if value.shape[0] % local_devices:
            raise ValueError(f"batch field {name!r}: {value.shape[0]} examples do not split "
                             f"over {local_devices} local devices")
    return {name: jax.make_array_from_process_local_data(sharding, value)
            for name, value in local_batch.items()}


def prefetch_to_devices(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                        size: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Keeps `size` batches in flight to the devices so the host never stalls a step."""
    queue: collections.deque = collections.deque()
    iterator = iter(batches)
    for batch in itertools.islice(iterator, size):
        queue.append(to_global_batch(batch, mesh))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(to_global_batch(batch, mesh))
