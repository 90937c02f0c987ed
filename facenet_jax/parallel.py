"""Device mesh, global-array shardings, per-device programs under shard_map, multi-host start-up.

The train step (train/step.py) is jitted over global arrays laid out on a 1-D mesh with axis
`AXIS` (`replicated`, `batch_sharded`, `put_with_specs`); only the objective's per-device sums
run under `jax.shard_map` inside it (check_vma=True, differentiated outside). Per-device
functions written with pmap semantics (each sees its own shard and combines results with
collectives over `AXIS`; the embedder) run under `shard_per_device`:
`jax.jit(jax.shard_map(..., check_vma=False))`. `jax.pmap` is in maintenance mode and has
itself been built on shard_map since JAX 0.8, so the code targets shard_map directly. With
`check_vma=False` nothing is summed behind our back: collectives transpose as under pmap
(psum ↔ psum, all_gather ↔ psum_scatter).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"

# Set by hand for a launch without a cluster manager, with JAX's own JAX_COORDINATOR_ADDRESS
# (JAX 0.10 reads only that one from the environment; this module reads the other two).
NUM_PROCESSES_VAR, PROCESS_ID_VAR = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def distributed_init_kwargs(distributed: bool, environ: Mapping[str, str]
                            ) -> dict[str, Any] | None:
    """What to pass to `jax.distributed.initialize`, or None to stay a single process.

    Multi-process when `distributed` is set, when JAX_COORDINATOR_ADDRESS is set (a hand
    launch: then JAX_NUM_PROCESSES and JAX_PROCESS_ID are required), or when a cluster manager
    that JAX detects by itself reports more than one process (Slurm under srun, Open MPI's
    mpirun, a multi-host TPU slice). Arguments missing here are left to JAX's own detection. A
    one-task Slurm allocation or a single mpirun rank stays a single process: it has nothing
    to coordinate, and an initialize there would only wait on a coordinator.
    """
    coordinator = environ.get("JAX_COORDINATOR_ADDRESS")
    given = {name: environ.get(name) for name in (NUM_PROCESSES_VAR, PROCESS_ID_VAR)}
    if coordinator and not (all(given.values()) or _managed_cluster_size(environ) > 1):
        missing = [name for name, value in given.items() if not value]
        raise ValueError(
            f"JAX_COORDINATOR_ADDRESS={coordinator} is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: set {NUM_PROCESSES_VAR} (the process "
            f"count) and {PROCESS_ID_VAR} (0 … count-1, a different one per process), or unset "
            "JAX_COORDINATOR_ADDRESS for a single-process run")
    if not (distributed or coordinator or _managed_cluster_size(environ) > 1):
        return None
    kwargs: dict[str, Any] = {}
    for key, name in (("num_processes", NUM_PROCESSES_VAR), ("process_id", PROCESS_ID_VAR)):
        if given[name]:
            try:
                kwargs[key] = int(given[name])
            except ValueError:
                raise ValueError(f"{name}={given[name]!r} is not an integer") from None
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    return kwargs


def _managed_cluster_size(environ: Mapping[str, str]) -> int:
    """Process count announced by Slurm (srun), Open MPI or a multi-host TPU slice; else 1."""
    if environ.get("SLURM_STEP_NODELIST") and environ.get("SLURM_NTASKS"):
        return int(environ["SLURM_NTASKS"])
    if environ.get("OMPI_MCA_orte_hnp_uri") and environ.get("OMPI_COMM_WORLD_SIZE"):
        return int(environ["OMPI_COMM_WORLD_SIZE"])
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    return max(len([h for h in hosts.split(",") if h]), 1)


def maybe_initialize_distributed(distributed: bool) -> None:
    """Calls `jax.distributed.initialize(...)` when `distributed_init_kwargs` says so.

    Must run before any other JAX call that touches a device. Afterwards `jax.devices()` lists
    every process's devices (the mesh spans them all) and `jax.process_index()` tells this
    process which rows of each global batch to load.
    """
    if jax.distributed.is_initialized():
        return
    kwargs = distributed_init_kwargs(distributed, os.environ)
    if kwargs is None:
        return
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as error:
        raise ValueError(
            f"jax.distributed.initialize failed ({error}). Outside Slurm, Open MPI and TPU "
            f"slices, set JAX_COORDINATOR_ADDRESS=host:port (of process 0), "
            f"{NUM_PROCESSES_VAR} and {PROCESS_ID_VAR} in every process, or set "
            "config.parallel.distributed=False for a single-process run") from error
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def host_device_flags(xla_flags: str, count: int) -> str:
    """XLA_FLAGS `xla_flags` asking for `count` host CPU devices (any earlier count replaced,
    the other flags kept): for a process about to start, before it imports jax."""
    kept = [flag for flag in xla_flags.split() if not flag.startswith(_HOST_DEVICES_FLAG)]
    return " ".join([*kept, f"{_HOST_DEVICES_FLAG}={count}"])


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or the first `num_devices`) devices of every process, axis `AXIS`.

    Auto axis types: inputs may arrive unsharded (`jax.make_mesh` defaults to Explicit axes,
    which reject them).
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


def put_with_specs(tree: Any, specs: Any, mesh: Mesh) -> Any:
    """Places an identical host pytree on the mesh, each leaf (or subtree) laid out by its
    PartitionSpec in `specs` (a prefix of `tree`): P() replicated, P(AXIS) split along the
    first dimension (every process passes the whole tree)."""
    def put(spec: P, subtree: Any) -> Any:
        return jax.device_put(subtree, NamedSharding(mesh, spec))
    return jax.tree.map(put, specs, tree, is_leaf=lambda x: isinstance(x, P))


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
