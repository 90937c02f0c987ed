"""Device mesh, per-device programs under shard_map, multi-host start-up.

Every per-device function in this project is written with pmap semantics: it sees its own shard
of the batch and combines results with collectives over the axis name `AXIS`. It runs under
`jax.jit(jax.shard_map(..., check_vma=False))` over a 1-D mesh: `jax.pmap` is in maintenance mode
and has itself been built on shard_map since JAX 0.8, so the code targets shard_map directly. With
`check_vma=False` nothing is summed behind our back: collectives transpose as under pmap (psum ↔
psum, all_gather ↔ psum_scatter), so the gradient of the sum of per-device objectives is the
psum of the per-device gradients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"

_CLUSTER_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                     "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(distributed: bool) -> None:
    """Calls `jax.distributed.initialize()` when asked to or when a cluster is detected.

    With `distributed=False` and none of the usual cluster variables set, it does nothing, so a
    single-process run never waits on a coordinator. Must run before any other JAX call.
    """
    if jax.distributed.is_initialized():
        return
    cluster = any(os.environ.get(name) for name in _CLUSTER_ENV_VARS)
    if distributed or cluster:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or the first `num_devices`) devices of every process, axis `AXIS`.

    Auto axis types: inputs may arrive unsharded (DESIGN §4: `jax.make_mesh` defaults to
    Explicit axes, which reject them).
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"asked for {num_devices} devices but {len(devices)} are available")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def shard_per_device(fn: Callable, mesh: Mesh, *, in_specs: Any, out_specs: Any,
                     donate_argnums: tuple[int, ...] = ()) -> Callable:
    """`jit(shard_map(fn))` over `mesh` with pmap semantics (check_vma=False)."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate_argnums)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places an identical host pytree on every device of the mesh (every process passes it)."""
    return jax.device_put(tree, replicated(mesh))


def put_global_batch(local_rows: Any, mesh: Mesh) -> Any:
    """Builds the global batch-sharded arrays from this process's contiguous rows.

    `local_rows`: pytree of numpy arrays holding rows [i*n/p, (i+1)*n/p) of the global batch
    for process i of p (with one process: the whole batch).
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_rows)


def to_host(tree: Any) -> Any:
    """Fetches replicated device values to numpy; works when they span several processes."""
    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)
