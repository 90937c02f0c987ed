"""Cross-batch memory (XBM; Wang et al., CVPR 2020): earlier batches' embeddings as candidates.

A FIFO of the last M embeddings (with their labels) of earlier batches, kept detached. Once
training has warmed up, embeddings drift slowly, so these are valid extra positives and
negatives: a small batch mines against the negatives of a large one. As in the paper's
trainer, the objective of a step is

    loss(batch) + weight · loss(the batch's anchors mined against the memory)

and the step's (global) batch is enqueued after the step, from step `start_step` on. The
memory's loss uses the same strategy, margin, distance and options as the batch's: every
strategy mines against it (`triplet_loss_sums` with a candidate mask, so only filled memory
slots are candidates and the batch's own rows are not). Gradients flow only through the batch's
anchors.

Pure functions and the state they act on; the triplet objective (objectives/triplet.py) wires
them into the step: the memory's loss per device (each device's anchors, under the step's
shard_map), its update over global arrays (the global batch enqueued, no per-device code). The
memory lives in the train state (state.py, `extra`), replicated on every device.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

from facenet_jax.losses.triplet import TripletSums, triplet_loss_sums

# config.loss.memory's keys and the values that switch the memory off (today's behaviour).
CONFIG_DEFAULTS = {"size": 0, "start_step": 0, "weight": 1.0}


@flax.struct.dataclass
class CrossBatchMemory:
    """The FIFO. embeddings: [M,D] float32; labels: [M] int32; valid: [M] bool (slot filled);
    position: int32 scalar, the slot the next enqueue writes first (the oldest entry once
    the memory is full)."""

    embeddings: jax.Array
    labels: jax.Array
    valid: jax.Array
    position: jax.Array


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """The memory's settings (hashable: a static argument of the compiled step)."""

    size: int
    start_step: int = 0
    weight: float = 1.0

    @classmethod
    def from_config(cls, loss_config: Any) -> "MemorySpec | None":
        """`config.loss.memory` -> a spec, or None when the memory is off (size 0, or no
        memory block: a loss config built by hand without one)."""
        settings = {**CONFIG_DEFAULTS, **dict(loss_config.get("memory", None) or {})}
        if not settings["size"]:
            return None
        return cls(size=int(settings["size"]), start_step=int(settings["start_step"]),
                   weight=float(settings["weight"]))


def validate_memory_config(memory_config: Any, global_batch: int) -> None:
    """ValueError naming the key and the fix for a bad `config.loss.memory`."""
    settings = {**CONFIG_DEFAULTS, **dict(memory_config or {})}
    unknown = sorted(set(settings) - set(CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config.loss.memory; valid keys: "
                         f"{', '.join(CONFIG_DEFAULTS)}")
    size, start, weight = settings["size"], settings["start_step"], settings["weight"]
    for name, value in (("size", size), ("start_step", start)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"config.loss.memory.{name} must be an int >= 0, got {value!r}")
    if 0 < size < global_batch:
        raise ValueError(
            f"config.loss.memory.size={size} is below the global batch of {global_batch} "
            "images, which one enqueue writes at once; use 0 (no memory) or a size >= "
            f"{global_batch} (the paper uses thousands up to the dataset size)")
    if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight) or weight < 0):
        raise ValueError(f"config.loss.memory.weight must be a finite number >= 0, got "
                         f"{weight!r}")


def init_memory(size: int, embedding_dim: int) -> CrossBatchMemory:
    """An empty memory of `size` slots for `embedding_dim`-d embeddings."""
    if size < 1 or embedding_dim < 1:
        raise ValueError(f"a memory needs size >= 1 and embedding_dim >= 1, got size={size}, "
                         f"embedding_dim={embedding_dim}")
    return CrossBatchMemory(embeddings=jnp.zeros((size, embedding_dim), jnp.float32),
                            labels=jnp.zeros((size,), jnp.int32),
                            valid=jnp.zeros((size,), bool),
                            position=jnp.zeros((), jnp.int32))


def enqueue(memory: CrossBatchMemory, embeddings: jax.Array,
            labels: jax.Array) -> CrossBatchMemory:
    """Writes `embeddings` [n,D] and `labels` [n] into the next n slots (wrapping around, so
    the oldest entries go first); n must not exceed the memory size. Detached."""
    size, n = memory.labels.shape[0], embeddings.shape[0]
    if n > size:
        raise ValueError(f"cannot enqueue {n} embeddings into a memory of {size} slots")
    slots = (memory.position + jnp.arange(n)) % size
    return CrossBatchMemory(
        embeddings=memory.embeddings.at[slots].set(
            lax.stop_gradient(embeddings).astype(memory.embeddings.dtype)),
        labels=memory.labels.at[slots].set(labels.astype(memory.labels.dtype)),
        valid=memory.valid.at[slots].set(True),
        position=((memory.position + n) % size).astype(jnp.int32))


def enqueue_from(memory: CrossBatchMemory, embeddings: jax.Array, labels: jax.Array,
                 step: jax.Array | int, start_step: int) -> CrossBatchMemory:
    """`enqueue` when `step` (traced: the step just taken, counted from 0) >= start_step,
    else the memory unchanged."""
    return lax.cond(step >= start_step, lambda: enqueue(memory, embeddings, labels),
                    lambda: memory)


def memory_loss_sums(embeddings: jax.Array, labels: jax.Array, memory: CrossBatchMemory, *,
                     anchor_start: jax.Array | int, num_anchors: int,
                     **loss_kwargs: Any) -> TripletSums:
    """Sums (SUM_KEYS) of anchors [anchor_start, +num_anchors) of the batch mined against the
    filled slots of the memory alone.

    embeddings: [B,D], labels: [B] (the batch the anchors are rows of); `loss_kwargs` are
    `triplet_loss_sums`'s (margin, strategy, distance, soft, key, anchor_chunk, options).
    The memory's rows are detached; the batch's rows are anchors only, never candidates.
    """
    batch = embeddings.shape[0]
    candidates = jnp.concatenate(
        [embeddings, lax.stop_gradient(memory.embeddings).astype(embeddings.dtype)])
    candidate_labels = jnp.concatenate([labels.astype(jnp.int32), memory.labels])
    mask = jnp.concatenate([jnp.zeros((batch,), bool), memory.valid])
    return triplet_loss_sums(candidates, candidate_labels, anchor_start=anchor_start,
                             num_anchors=num_anchors, candidate_mask=mask, **loss_kwargs)
