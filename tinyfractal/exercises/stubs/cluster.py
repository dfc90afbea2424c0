"""Exercises for lesson 8, from the classroom to the cluster (handout: lessons/cluster.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check cluster

No JAX is needed: these are the sums a mesh does, written with NumPy.

`ids` and `targets` are (B, T) arrays of token ids: B rows (the batch), T positions (cfg.context).
A mesh of `devices` devices is laid out as a grid of `data` rows by `model` columns, device k at
data row k // model and model column k % model (numpy's reshape of the device list). Along `data`
the batch rows are split in equal contiguous parts; along `model`, the N models of a level are split
in equal contiguous parts when `model` divides N, and otherwise every device keeps all N.
"""
import numpy as np

from tinyfractal.training.data import batch_at      # batch_at(tokens, B, T, seed, step) -> (ids, targets)


def rows_per_device(batch_size, devices, model_axis):
    """How many batch rows each device reads on a mesh of `devices` devices with a model axis of
    `model_axis` (so data = devices / model_axis). An int. Raise ValueError when model_axis does not
    divide the devices, or when the data axis does not divide the batch (every device gets whole rows).
    """
    raise NotImplementedError


def device_block(batch_size, n_models, data, model, device):
    """What device number `device` of a (data x model) mesh holds of one level's logits (N, B, T, V),
    N = n_models: ((first row, row after the last), (first model, model after the last)).

    Example: batch 4, 4 models, data 2 x model 2: device 1 holds ((0, 2), (2, 4)), rows 0-1 of
    models 2-3.
    """
    raise NotImplementedError


def local_batch(tokens, batch_size, context, seed, step, process, processes):
    """The (ids, targets) that process `process` of `processes` trains on at this step: its own
    batch_size / processes consecutive rows of the step's GLOBAL batch of batch_size windows, which
    every process builds alike from (seed, step) with batch_at. Process p holds rows
    [p * B/P, (p+1) * B/P).
    """
    raise NotImplementedError


def allreduce_mean(grads, rows):
    """The gradient of the loss over the whole batch, from the devices' own gradients.

    grads[k] is a dict {array name: gradient array} computed by device k from ITS rows alone, of the
    mean loss over those rows; rows[k] is how many batch rows device k read. The loss of the whole
    batch is the mean over all rows. Return one dict with the same names. (On a real mesh every
    device gets the same rows, and XLA's all-reduce does this sum for you.)
    """
    raise NotImplementedError
