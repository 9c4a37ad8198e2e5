"""Bytes each data-parallel train step all-reduces (B0 and B5), read from the lowered program.

`PYTHONPATH=. python benchmarks/allreduce_bytes.py`: traces and lowers the train step for 8
devices without compiling it, and sums the operands of its all-reduce ops (the gradient sum
over devices that shard_map inserts, synchronised BatchNorm statistics, loss and metric sums).
What crosses the network per step is about twice this per device with a ring all-reduce.
"""
import os
import re

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxseg import colour, models, parallel, steps  # noqa: E402
from jaxseg.configs import b5 as b5_config, cpu as cpu_config  # noqa: E402

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4}
ALL_REDUCE = re.compile(r'"stablehlo.all_reduce"\((.*?)\}\) : \((.*?)\) ->', re.S)


def allreduce_bytes(config: ml_collections.ConfigDict, image_size: int) -> tuple[int, int, int]:
    """(parameters, all-reduce operands, their bytes) of one train step."""
    mesh = parallel.make_mesh()
    model = models.build_model(config, bn_axis_name=parallel.AXIS)
    compiled = steps.CompiledSteps(model, config.loss, mesh)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    split, replicated = NamedSharding(mesh, PartitionSpec(parallel.AXIS)), NamedSharding(
        mesh, PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         jax.eval_shape(lambda v: steps.create_train_state(v, compiled.tx, 0),
                                        variables))
    batch = {name: jax.ShapeDtypeStruct((8, image_size, image_size, channels), jnp.uint8,
                                        sharding=split)
             for name, channels in (("image", 3), ("mask", 1))}
    batch["colour_factors"] = jax.ShapeDtypeStruct((8, colour.NUM_FACTORS), jnp.float32,
                                                   sharding=split)
    text = compiled.train(False).lower(state, batch, np.float32(1e-3)).as_text()
    operands = [tensor for match in ALL_REDUCE.finditer(text)
                for tensor in re.findall(r"tensor<([^>]*)>", match.group(2))]
    total = 0
    for tensor in operands:
        *dims, dtype = tensor.split("x")
        total += int(np.prod([int(d) for d in dims])) * DTYPE_BYTES[dtype]
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    return parameters, len(operands), total


if __name__ == "__main__":
    for name, config in (("B0", cpu_config.get_config()), ("B5", b5_config.get_config())):
        print(name, "half_precision", config.half_precision,
              "parameters, all-reduce operands, bytes:", allreduce_bytes(config, 64), flush=True)
