"""Margin-softmax classification losses, with the class centres shardable over a mesh axis.

Heads (the logit z_c of a unit embedding e against class c; y is the row's label; W_c a class
centre, b_c its bias; cos θ_c = ê·Ŵ_c with ê, Ŵ_c the unit vectors), entries of
`CLASSIFICATION_HEADS`:

- "softmax" (`LinearHead`): z_c = e·W_c + b_c, a plain linear layer on the (already unit)
  embedding, centres not normalised (the classic softmax baseline, as in davidsandberg/facenet's
  best models).
- The cosine heads (`MarginHead`) share one formula, insightface's combined margin with m1 = 1:
  z_y = s·(cos(θ_y + m2) − m3), others s·cos θ_c (`combined_margin`). Each head says which of
  m2 (an angle added to θ_y) and m3 (subtracted from the cosine) its `margin` m sets:
  - "normface": m2 = m3 = 0 (Wang, Xiang, Cheng, Yuille, "NormFace", ACM MM 2017). NormFace
    learns s; here it is fixed and defaults to the margin heads' s, so "normface" is exactly
    their m = 0 limit (an ablation of the margin alone).
  - "cosface": m3 = m (Wang et al., "CosFace: Large Margin Cosine Loss", CVPR 2018; s = 64,
    m = 0.35).
  - "arcface": m2 = m (Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss",
    CVPR 2019; s = 64, m = 0.5). Where θ_y + m2 > π, cos(θ_y + m2) would rise again with θ_y
    (a wrong-way gradient), so insightface's substitute cos θ_y − m2·sin m2 is used where
    cos θ_y <= cos(π − m2) ("easy_margin=False"; the value jumps down there from −1 to
    −cos m2 − m2·sin m2, and stays decreasing in θ_y for the allowed 0 <= m2 < π/2).
  SphereFace's multiplicative m1 is left out, as in insightface's current code.

The loss is the cross-entropy of softmax(z) at y. `class_logits` gives the logits of one shard of
centres (global ids [label_offset, label_offset + C_local)); `softmax_cross_entropy_sums`
combines the shards' row max (`lax.pmax`) and normaliser (`lax.psum`) over `axis_name`.
Partial FC (An et al., "Killing Two Birds with One Stone: Efficient and Robust Training of Face
Recognition CNNs by Partial FC", CVPR 2022) restricts the normaliser to a sampled class set
(`partial_fc_mask`), drawn over global class ids so that it does not depend on the sharding.

Sums, not means: each row's loss is added on the one device holding its target class, so the
psum of "loss_sum" and "count" over the devices is the global batch's, and a batch split into
parts gives the exact mean once the parts' sums are added (`reduce_classification_sums`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from facenet_jax.losses.distances import l2_normalize
from facenet_jax.registry import Registry

CLASSIFICATION_SUM_KEYS = ("loss_sum", "count", "correct")

# sin θ = sqrt(max(1 − cos²θ, _SIN_SQUARED_FLOOR)): a finite gradient at cos θ = ±1 (θ = 0, π).
# In float32, 1 − cos² is either 0 or >= 1.2e-7, so the floor only acts at exactly ±1.
_SIN_SQUARED_FLOOR = 1e-12

ClassificationSums = dict[str, jax.Array]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_zero(value: Any) -> bool:
    """A margin known (not traced) to be 0: the formula's term then drops out exactly."""
    return _is_number(value) and value == 0


def combined_margin(cos_target: jax.Array, angular_margin: Any = 0.0,
                    additive_margin: Any = 0.0) -> jax.Array:
    """insightface's combined margin with m1 = 1: cos(θ + m2) − m3 of target cosines.

    cos_target: [B] cos θ (any shape works); angular_margin m2 (radians, 0 <= m2 < π/2) and
    additive_margin m3: numbers or traced scalars. Where θ >= π − m2 (cos θ <= cos(π − m2)),
    cos(θ + m2) would rise again with θ, so ArcFace's monotone substitute cos θ − m2·sin m2
    takes its place (see the module docstring). cos(θ + m2) = cos θ cos m2 − sin θ sin m2 with
    sin θ = sqrt(max(1 − cos²θ, floor)): no arccos, value and gradient finite at θ = 0 and π.
    An m2 known to be 0 skips the trigonometry: cos(θ + 0) is cos θ itself.
    """
    if _is_zero(angular_margin):
        return cos_target - additive_margin
    cos_theta = jnp.clip(cos_target, -1.0, 1.0)
    sin_theta = jnp.sqrt(jnp.maximum(1.0 - cos_theta * cos_theta, _SIN_SQUARED_FLOOR))
    cos_theta_m = cos_theta * jnp.cos(angular_margin) - sin_theta * jnp.sin(angular_margin)
    past_pi = cos_theta <= jnp.cos(jnp.pi - angular_margin)  # θ >= π − m2
    shifted = jnp.where(past_pi, cos_theta - angular_margin * jnp.sin(angular_margin),
                        cos_theta_m)
    return shifted - additive_margin


def _check_finite_numbers(head: str, scale: Any, margin: Any) -> None:
    """scale and margin: None, traced (e.g. vmap over margins: not checkable) or finite."""
    for name, value in (("scale", scale), ("margin", margin)):
        if value is None or isinstance(value, jax.core.Tracer):
            continue
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{head} {name} must be a finite number (or None for the paper "
                             f"default), got {value!r}")


def _target_mask(labels: jax.Array, label_offset: Any, num_local: int) -> jax.Array:
    """[B] global labels -> bool [B, C_local]: True at the row's target if this shard holds it."""
    return jnp.arange(num_local)[None, :] == (labels - label_offset)[:, None]


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """z_c = e·W_c (+ b_c): unnormalised centres and an optional bias; no scale, no margin."""

    has_bias = True
    default_scale = None
    default_margin = None

    def validate(self, head: str, scale: Any, margin: Any) -> None:
        _check_finite_numbers(head, scale, margin)
        if scale is not None or margin is not None:
            raise ValueError(
                f"head {head!r} has no scale or margin (its logits are e·W + b); leave both "
                f"unset, or use {_names_or(_scaled_heads())} for a scaled cosine head (got "
                f"scale={scale!r}, margin={margin!r})")

    def logits(self, embeddings: jax.Array, centres: jax.Array, bias: jax.Array | None,
               labels: jax.Array, *, scale: Any, margin: Any, label_offset: Any) -> jax.Array:
        """[B,D] float32, [C,D] float32, [C] | None -> [B,C] float32."""
        del labels, scale, margin, label_offset
        logits = embeddings @ centres.T
        if bias is None:
            return logits
        if bias.shape != (centres.shape[0],):
            raise ValueError(f"bias has shape {bias.shape}; it must be ({centres.shape[0]},), "
                             "one per class centre")
        return logits + bias.astype(jnp.float32)[None, :]


@dataclasses.dataclass(frozen=True)
class MarginHead:
    """z_c = s·cos θ_c, the target's s·(cos(θ_y + m2) − m3) (`combined_margin`), the head's
    margin m being m2 (`angular`) or m3 (`additive`) or neither (no margin: NormFace).

    formula: how the margin enters, for error messages; max_margin: an exclusive upper bound
    on m (None: none), `max_margin_reason` saying why.
    """

    default_scale: float
    default_margin: float | None = None
    angular: bool = False
    additive: bool = False
    formula: str = ""
    max_margin: float | None = None
    max_margin_reason: str = ""

    has_bias = False

    def margins(self, margin: Any) -> tuple[Any, Any]:
        """The combined formula's (m2, m3) for the head's resolved margin."""
        return (margin if self.angular else 0.0), (margin if self.additive else 0.0)

    def validate(self, head: str, scale: Any, margin: Any) -> None:
        _check_finite_numbers(head, scale, margin)
        if self.default_margin is None and margin is not None:
            raise ValueError(
                f"head {head!r} has no margin (got margin={margin!r}); leave it unset, or use "
                + " or ".join(f"{name!r} ({CLASSIFICATION_HEADS.get(name).formula})"
                              for name in _margin_heads())
                + " for a margin")
        if _is_number(scale) and scale <= 0:
            raise ValueError(f"{head} scale must be > 0 (the paper uses "
                             f"{self.default_scale:g}), got {scale!r}")
        if not _is_number(margin):
            return
        if margin < 0:
            raise ValueError(f"{head} margin must be >= 0 (the paper uses "
                             f"{self.default_margin}), got {margin!r}")
        if self.max_margin is not None and margin >= self.max_margin:
            raise ValueError(f"{head} margin {self.max_margin_reason}; the paper uses "
                             f"{self.default_margin}, got {margin!r}")

    def logits(self, embeddings: jax.Array, centres: jax.Array, bias: jax.Array | None,
               labels: jax.Array, *, scale: Any, margin: Any, label_offset: Any) -> jax.Array:
        """[B,D] float32, [C,D] float32, bias None -> [B,C] float32."""
        del bias
        cosine = l2_normalize(embeddings) @ l2_normalize(centres).T
        angular, additive = self.margins(margin)
        if _is_zero(angular) and _is_zero(additive):
            return scale * cosine
        # The margin only touches one entry per row, so work on the [B] target cosines.
        is_target = _target_mask(labels, label_offset, centres.shape[0])
        cos_target = jnp.sum(jnp.where(is_target, cosine, 0.0), axis=1)
        target = combined_margin(cos_target, angular, additive)
        return scale * jnp.where(is_target, target[:, None], cosine)


# config.loss.classification.head: name -> LinearHead | MarginHead.
CLASSIFICATION_HEADS: Registry[LinearHead | MarginHead] = Registry(
    "classification head", valid="valid heads")
CLASSIFICATION_HEADS.add("softmax", LinearHead())
CLASSIFICATION_HEADS.add("normface", MarginHead(default_scale=64.0))
CLASSIFICATION_HEADS.add("cosface", MarginHead(default_scale=64.0, default_margin=0.35,
                                               additive=True, formula="cos θ − m"))
CLASSIFICATION_HEADS.add("arcface", MarginHead(
    default_scale=64.0, default_margin=0.5, angular=True, formula="cos(θ + m)",
    max_margin=math.pi / 2,
    max_margin_reason="is an angle in radians and must be < π/2: beyond, even a perfect "
                      "match's target logit s·cos m is negative, and from m ≈ 2.33 the "
                      "substitute past θ = π − m is no longer monotone"))

# The built-in heads and their paper defaults (None: the head has no such parameter).
HEADS = CLASSIFICATION_HEADS.names()
DEFAULT_SCALE: dict[str, float | None] = {
    name: CLASSIFICATION_HEADS.get(name).default_scale for name in HEADS}
DEFAULT_MARGIN: dict[str, float | None] = {
    name: CLASSIFICATION_HEADS.get(name).default_margin for name in HEADS}


def _scaled_heads() -> list[str]:
    return [n for n in CLASSIFICATION_HEADS.names()
            if CLASSIFICATION_HEADS.get(n).default_scale is not None]


def _margin_heads() -> list[str]:
    return [n for n in CLASSIFICATION_HEADS.names()
            if CLASSIFICATION_HEADS.get(n).default_margin is not None]


def _biased_heads() -> list[str]:
    return [n for n in CLASSIFICATION_HEADS.names() if CLASSIFICATION_HEADS.get(n).has_bias]


def _names_or(names: list[str]) -> str:
    """['a', 'b', 'c'] -> "'a', 'b' or 'c'"."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def validate_classification_args(head: str, scale: Any, margin: Any) -> None:
    """Pure-Python checks, no JAX work: ValueError naming the problem and the fix.

    scale and margin may be None (the head's paper default, see `resolve_head`). A traced value
    (e.g. under vmap over margins) skips the value checks.
    """
    CLASSIFICATION_HEADS.get(head).validate(head, scale, margin)


def resolve_head(head: str, scale: Any = None, margin: Any = None
                 ) -> tuple[float | None, float | None]:
    """(scale, margin) with None filled by the head's paper default (DEFAULT_SCALE/MARGIN).

    Validates first. softmax -> (None, None); normface -> (s, None).
    """
    validate_classification_args(head, scale, margin)
    spec = CLASSIFICATION_HEADS.get(head)
    return (spec.default_scale if scale is None else scale,
            spec.default_margin if margin is None else margin)


def _check_labels(labels: jax.Array, num_rows: int) -> None:
    if labels.shape != (num_rows,):
        raise ValueError(f"labels have shape {labels.shape}; they must be ({num_rows},), one "
                         "class id per embedding row")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")


def _check_label_range(labels: jax.Array, low: Any, high: int) -> None:
    """With concrete labels and offset (eager calls), every label must lie in [low, high).
    Traced labels cannot be checked: their rows then count on no device (see module doc)."""
    if isinstance(labels, jax.core.Tracer) or isinstance(low, jax.core.Tracer):
        return
    values = np.asarray(labels)
    bad = values[(values < int(low)) | (values >= high)]
    if bad.size:
        raise ValueError(f"labels {sorted(set(bad.tolist()))[:5]} lie outside the classes "
                         f"[{int(low)}, {high}) of the centres; labels must be the training "
                         "split's identity ids 0 … num_classes − 1")


def class_logits(embeddings: jax.Array, centres: jax.Array, bias: jax.Array | None,
                 labels: jax.Array, *, head: str, scale: Any = None, margin: Any = None,
                 label_offset: jax.Array | int = 0) -> jax.Array:
    """Logits of every row against one shard of class centres (module docstring: the heads).

    embeddings: [B,D] unit rows (the encoder's output; the cosine heads re-normalise, which
    changes nothing for unit rows); centres: [C,D], the classes with global ids
    [label_offset, label_offset + C) (label_offset may be traced, e.g. axis_index * C);
    bias: [C] or None, "softmax" only; labels: [B] int global class ids (a label outside this
    shard gets no margin here). scale/margin: None means the paper default. Any float dtype in,
    computed and returned in float32: [B,C].
    """
    scale, margin = resolve_head(head, scale, margin)
    if embeddings.ndim != 2 or centres.ndim != 2 or embeddings.shape[1] != centres.shape[1]:
        raise ValueError(f"embeddings {embeddings.shape} and centres {centres.shape} must be "
                         "[B, D] and [C, D] with the same D")
    _check_labels(labels, embeddings.shape[0])
    spec = CLASSIFICATION_HEADS.get(head)
    if bias is not None and not spec.has_bias:
        raise ValueError(f"head {head!r} is a cosine head and takes no bias; pass bias=None "
                         f"(only {_names_or(_biased_heads())} has one)")
    return spec.logits(
        embeddings.astype(jnp.float32), centres.astype(jnp.float32), bias, labels,
        scale=scale, margin=margin, label_offset=label_offset)


def softmax_cross_entropy_sums(logits: jax.Array, labels: jax.Array, *,
                               label_offset: jax.Array | int = 0, axis_name: str | None = None,
                               class_mask: jax.Array | None = None) -> ClassificationSums:
    """Cross-entropy sums of the rows whose target class this shard holds.

    logits: [B, C_local], the columns being global classes [label_offset,
    label_offset + C_local); labels: [B] int global class ids; class_mask: optional bool
    [C_local], the classes in the softmax's normaliser (Partial FC); a row's target is always
    in, whatever the mask says.

    With axis_name (inside shard_map/pmap, every device holding one class shard and the same B
    rows): the row max is the `lax.pmax` of the shards' maxima (under stop_gradient; any
    constant works, it only keeps exp in range) and the normaliser the `lax.psum` of the
    shards' sums of exp. Each row's loss log Σ_c exp z_c − z_y is added on the one device
    holding its target, so "loss_sum", "count" (rows whose target is here) and "correct"
    (rows whose target logit is the row's largest over the normaliser's classes, ties
    counting as correct; with a margin head the margin-penalised logit) psum to the global
    batch's. Gradients: every device's objective loss_sum / psum(count) uses the psum'd
    normaliser only in its own rows, so the transpose of the psum (a psum, with
    check_vma=False) gives each device exactly softmax(z) − onehot(y) over the global count:
    the gradient of the sum of the per-device objectives is the one-device gradient, with no
    factor of the device count. Labels outside every shard (possible only when traced; eager
    calls without axis_name raise) count nowhere: psum(count) then falls short of B.

    Without axis_name: the plain one-device loss over these C_local classes. Returns float32
    scalars keyed by CLASSIFICATION_SUM_KEYS; only "loss_sum" carries a gradient.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got shape {logits.shape}")
    num_rows, num_local = logits.shape
    _check_labels(labels, num_rows)
    if axis_name is None:
        _check_label_range(labels, label_offset, num_local + _as_int(label_offset))
    if class_mask is not None and class_mask.shape != (num_local,):
        raise ValueError(f"class_mask has shape {class_mask.shape}; it must be ({num_local},), "
                         "one flag per class of this shard")
    logits = logits.astype(jnp.float32)
    is_target = _target_mask(labels, label_offset, num_local)
    in_shard = jnp.any(is_target, axis=1)
    if class_mask is None:
        active = jnp.ones_like(is_target)
    else:
        active = is_target | class_mask[None, :]
    # A finite floor (not −inf) so a shard with no active class of a row leaves the max finite.
    floor = jnp.finfo(jnp.float32).min
    row_max = jnp.max(jnp.where(active, lax.stop_gradient(logits), floor), axis=1)
    if axis_name is not None:
        row_max = lax.pmax(row_max, axis_name)
    row_max = lax.stop_gradient(row_max)
    # exp of −inf (not a where around exp): an inactive logit far above the max cannot overflow
    # into an inf whose zero cotangent would make a NaN gradient.
    exps = jnp.exp(jnp.where(active, logits - row_max[:, None], -jnp.inf))
    normaliser = jnp.sum(exps, axis=1)
    if axis_name is not None:
        normaliser = lax.psum(normaliser, axis_name)
    log_normaliser = jnp.log(jnp.maximum(normaliser, jnp.finfo(jnp.float32).tiny)) + row_max
    target = jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
    row_loss = jnp.where(in_shard, log_normaliser - target, 0.0)
    correct = in_shard & (lax.stop_gradient(target) >= row_max)
    return {"loss_sum": jnp.sum(row_loss),
            "count": jnp.sum(in_shard, dtype=jnp.float32),
            "correct": jnp.sum(correct, dtype=jnp.float32)}


def _as_int(value: Any) -> int:
    """A concrete offset as int; a traced one as 0 (its range check is skipped anyway)."""
    return 0 if isinstance(value, jax.core.Tracer) else int(value)


def classification_loss_sums(embeddings: jax.Array, centres: jax.Array, bias: jax.Array | None,
                             labels: jax.Array, *, head: str, scale: Any = None,
                             margin: Any = None, label_offset: jax.Array | int = 0,
                             axis_name: str | None = None,
                             class_mask: jax.Array | None = None) -> ClassificationSums:
    """`class_logits` then `softmax_cross_entropy_sums`, same arguments and shapes.

    embeddings: [B,D] (inside shard_map: the all-gathered global batch); centres: [C_local,D];
    bias: [C_local] | None; labels: [B]; class_mask: [C_local] bool | None.
    """
    logits = class_logits(embeddings, centres, bias, labels, head=head, scale=scale,
                          margin=margin, label_offset=label_offset)
    return softmax_cross_entropy_sums(logits, labels, label_offset=label_offset,
                                      axis_name=axis_name, class_mask=class_mask)


def reduce_classification_sums(sums: ClassificationSums
                               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sums (added over devices or batch parts) -> (mean loss, {"accuracy"}), NaN-free at 0."""
    count = jnp.maximum(sums["count"], 1.0)
    return sums["loss_sum"] / count, {"accuracy": sums["correct"] / count}


def classification_loss(embeddings: jax.Array, centres: jax.Array, bias: jax.Array | None,
                        labels: jax.Array, *, head: str, scale: Any = None, margin: Any = None,
                        class_mask: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One device holding every class: mean loss over the batch and the top-1 accuracy.

    embeddings: [B,D]; centres: [C,D]; bias: [C] | None; labels: [B] in [0, C).
    """
    return reduce_classification_sums(classification_loss_sums(
        embeddings, centres, bias, labels, head=head, scale=scale, margin=margin,
        class_mask=class_mask))


def validate_partial_fc_args(num_classes: Any, sample_fraction: Any) -> None:
    """ValueError unless num_classes is an int >= 1 and 0 < sample_fraction <= 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or \
            num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not _is_number(sample_fraction) or not 0 < sample_fraction <= 1:
        raise ValueError(f"sample_fraction must be a number in (0, 1] (1.0 = every class, "
                         f"Partial FC uses 0.1), got {sample_fraction!r}")


def partial_fc_num_active(num_classes: int, sample_fraction: float) -> int:
    """ceil(sample_fraction · num_classes), at least 1; rounded to 9 digits first, so that e.g.
    0.1 · 30 (3.0000000000000004 in floats) gives 3, not 4."""
    validate_partial_fc_args(num_classes, sample_fraction)
    return max(1, math.ceil(round(sample_fraction * num_classes, 9)))


def partial_fc_mask(key: jax.Array, labels: jax.Array, num_classes: int,
                    sample_fraction: float, *, shard_start: jax.Array | int = 0,
                    shard_size: int | None = None) -> jax.Array:
    """Partial FC's class sample (An et al. 2022), as a bool mask of one shard of the classes.

    key: a PRNG key, the same on every device (e.g. fold_in(run key, step)); labels: [B] int,
    the *global* batch's labels (rows with a label outside [0, num_classes) are ignored);
    num_classes, sample_fraction: static. Returns bool [shard_size] for global classes
    [shard_start, shard_start + shard_size) (shard_start may be traced; shard_size defaults
    to num_classes).

    Active: every class of the batch, plus the first of the others in a random order until
    max(partial_fc_num_active(num_classes, sample_fraction), number of batch classes) classes
    are active. The order is a sort of per-class uint32 draws from `key` over all global ids
    (ties broken by class id), so the set depends only on (key, labels) and never on the
    sharding: the shards of any layout concatenate to the same global mask. (insightface
    instead ranks random scores within each device's shard, so its sample changes with the
    device count.) sample_fraction = 1.0: every class, with no sort. Cost: one sort of
    num_classes keys per call, the same on every device.
    """
    num_active = partial_fc_num_active(num_classes, sample_fraction)
    shard_size = num_classes if shard_size is None else shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, numbers.Integral) or \
            not 1 <= shard_size <= num_classes:
        raise ValueError(f"shard_size must be an int in [1, {num_classes}], got {shard_size!r}")
    if isinstance(shard_start, numbers.Integral) and \
            not 0 <= shard_start <= num_classes - shard_size:
        raise ValueError(f"shard [{shard_start}, {shard_start + shard_size}) overhangs the "
                         f"{num_classes} classes; use 0 <= shard_start <= "
                         f"{num_classes - shard_size}")
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and "
                         f"dtype {labels.dtype}")
    if num_active >= num_classes:
        return jnp.ones((shard_size,), bool)
    in_range = (labels >= 0) & (labels < num_classes)
    # num_classes is out of bounds, so mode="drop" discards those rows (a −1 would wrap).
    positive = jnp.zeros((num_classes,), bool).at[
        jnp.where(in_range, labels, num_classes)].set(True, mode="drop")
    ids = jnp.arange(num_classes, dtype=jnp.int32)
    draws = jax.random.bits(key, (num_classes,), jnp.uint32)
    # Lexicographic (not a batch class, draw, id): batch classes first, then a uniformly random
    # order of the others with no ties.
    *_, order = lax.sort((jnp.logical_not(positive).astype(jnp.int32), draws, ids), num_keys=3)
    chosen = jnp.zeros((num_classes,), bool).at[order[:num_active]].set(True) | positive
    return lax.dynamic_slice(chosen, (shard_start,), (shard_size,))
