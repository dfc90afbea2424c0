"""Where the arrays live: a device mesh over every device of every host, and what is sharded on it.

The mesh has two axes, ("data", "model"), over all devices of all processes:

  data parallel (the default, model axis 1)   each device reads its own rows of the batch; every device
                                              holds all parameters (replicated); XLA adds the all-reduce
                                              that sums the gradients
  models over the "model" axis (--model-axis) a level is a stack of N independent models, so the
                                              devices of one data row can each run N/model of them.
                                              Levels whose N the axis does not divide stay whole.

Many hosts: every process runs this same program on the same global batch (batches are seeded by
step), puts its devices' rows on them, and reads the replicated results from its own devices. Only
process 0 prints and writes checkpoints. `initialize` starts `jax.distributed` from the environment:
JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; without them
JAX detects SLURM, Open MPI and TPU pods itself.
"""
import os

import jax
import numpy as onp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize():
    """Join a multi-process run with `jax.distributed.initialize` (call before any other JAX call).

    On CPU the processes talk through gloo, JAX's CPU collectives.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    count, rank = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    try:
        count = None if count is None else int(count)
        rank = None if rank is None else int(rank)
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got {count!r} and {rank!r}") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=rank)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--distributed could not start jax.distributed ({first}); set JAX_COORDINATOR_ADDRESS, "
                         f"JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM or on a TPU pod") from None


def is_main():
    """True in process 0, the one that prints and writes."""
    return jax.process_index() == 0


class Layout:
    """A mesh of every device as (data, model) and the shardings the engine uses on it."""

    def __init__(self, model_axis=1, devices=None):
        devices = list(jax.devices() if devices is None else devices)
        if isinstance(model_axis, bool) or not isinstance(model_axis, int) or model_axis < 1 \
                or len(devices) % model_axis:
            raise ValueError(f"the model axis must be a positive integer dividing the {len(devices)} devices, "
                             f"got {model_axis!r}")
        self.mesh = Mesh(onp.array(devices).reshape(len(devices) // model_axis, model_axis), ("data", "model"))
        self.data_size, self.model_size = len(devices) // model_axis, model_axis
        self.key = (tuple(d.id for d in devices), model_axis)     # equal keys: the same mesh
        self.replicated = NamedSharding(self.mesh, P())       # parameters, moments, scalars
        self.batch = NamedSharding(self.mesh, P("data"))      # (B,T) ids and targets: rows over "data"

    def describe(self):
        """One line: the mesh and what is sharded on it."""
        kinds = sorted({d.platform for d in self.mesh.devices.flat})
        text = (f"mesh of {self.mesh.devices.size} {'/'.join(kinds)} device(s) in {jax.process_count()} process(es): "
                f"data {self.data_size} x model {self.model_size}; batch rows sharded over 'data', parameters replicated")
        return text + ("; the models of each level sharded over 'model'" if self.model_size > 1 else "")

    def check_batch(self, batch_size):
        if batch_size % self.data_size:
            raise ValueError(f"the batch size {batch_size} must be a multiple of the data axis ({self.data_size} "
                             f"devices) so every device gets whole rows")

    def _model_spec(self, x, rest):
        """'model' on the leading N axis where the axis divides N, else the models stay whole."""
        spread = self.model_size > 1 and x.shape[0] % self.model_size == 0
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, P("model" if spread else None, *rest)))

    def models(self, x):
        """A level's stacked parameters (N, ...): the N models spread over the 'model' axis."""
        return self._model_spec(x, ()) if self.model_size > 1 else x

    def activations(self, x):
        """Activations (N, B, ...): models over 'model', batch rows over 'data'."""
        return self._model_spec(x, ("data",)) if self.model_size > 1 else x

    def put(self, array, sharding):
        """A global array from a host array that every process holds whole (each sends its own part)."""
        array = onp.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def put_tree(self, tree, sharding=None):
        return jax.tree_util.tree_map(lambda a: self.put(a, sharding or self.replicated), tree)


def host(x):
    """A replicated (or single-device) JAX array as a NumPy array, read from this process's first copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return onp.asarray(x)
