"""Optimisers and learning-rate schedules from the config (optax)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from facenet_jax.registry import Registry

# optimizer.name → builder(config.optimizer, schedule) -> the optimiser (weight decay, clipping
# and the backbone multiplier are added around it by make_optimizer).
OPTIMIZERS: Registry[Callable[[Any, optax.Schedule], optax.GradientTransformation]] = Registry(
    "optimizer.name")
# optimizer.schedule → builder(config.optimizer, peak, decay_steps, warmup, num_steps) -> the
# schedule after the linear warm-up.
SCHEDULES: Registry[Callable[..., optax.Schedule]] = Registry("optimizer.schedule",
                                                              valid="valid")
# The embedding head's scope in every encoder (models.layers.EmbeddingHead); everything else is
# the backbone that `backbone_lr_multiplier` scales.
HEAD_SCOPE = "EmbeddingHead_0"


def validate_optimizer_config(opt: Any, num_steps: int) -> None:
    """Raises ValueError for an unknown optimiser/schedule or an impossible setting."""
    OPTIMIZERS.get(opt.name)
    SCHEDULES.get(opt.schedule)
    if not opt.learning_rate > 0:
        raise ValueError(f"optimizer.learning_rate must be > 0, got {opt.learning_rate}")
    if opt.warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
    if opt.schedule == "piecewise" and not all(0 < b < 1 for b in opt.decay_boundaries):
        raise ValueError(
            "optimizer.decay_boundaries are fractions of num_steps in (0, 1), got "
            f"{tuple(opt.decay_boundaries)}")
    if not math.isfinite(opt.backbone_lr_multiplier) or opt.backbone_lr_multiplier < 0:
        raise ValueError("optimizer.backbone_lr_multiplier must be >= 0 and finite (0 freezes "
                         f"the backbone), got {opt.backbone_lr_multiplier}")
    if opt.weight_decay < 0 or (opt.grad_clip_norm is not None and opt.grad_clip_norm < 0):
        raise ValueError("optimizer.weight_decay and optimizer.grad_clip_norm must be >= 0")


def make_schedule(opt: Any, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine / piecewise-constant decay or a constant rate.

    The schedule is defined over the config's `num_steps`; a resumed run that raises
    `num_steps` stretches the remaining decay accordingly.
    """
    peak = opt.learning_rate
    warmup = int(min(opt.warmup_steps, max(num_steps - 1, 0)))
    decay_steps = max(num_steps - warmup, 1)
    after = SCHEDULES.get(opt.schedule)(opt, peak, decay_steps, warmup, num_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt: Any, num_steps: int) -> optax.GradientTransformation:
    """Clipping → the named optimiser → (coupled) weight decay, driven by `make_schedule`, over
    the train params {"encoder", "head"} (state.TrainState.params).

    AdamW decouples weight decay itself; for the others it is added to the gradient (L2), as in
    FaceNet-era training with AdaGrad / SGD. `grad_clip_norm` clips the whole tree by its
    global norm: the step runs over global arrays, so a head split over the mesh is clipped
    with the encoder as one device would. `backbone_lr_multiplier` scales the encoder's
    backbone (everything outside its embedding head, `param_groups`); the objective's own
    parameters (class centres) train at the base rate.
    """
    schedule = make_schedule(opt, num_steps)
    chain = []
    if opt.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.weight_decay and opt.name not in DECOUPLED_DECAY:
        chain.append(optax.add_decayed_weights(opt.weight_decay))
    chain.append(OPTIMIZERS.get(opt.name)(opt, schedule))
    if opt.backbone_lr_multiplier != 1.0:
        # Scaling the final updates scales the learning rate (and AdamW's decoupled decay)
        # exactly; 0 leaves the backbone's parameters untouched.
        chain.append(optax.multi_transform(
            {"head": optax.identity(), "backbone": optax.scale(opt.backbone_lr_multiplier)},
            param_groups))
    return optax.chain(*chain)


@SCHEDULES.register("cosine")
def _cosine(opt: Any, peak: float, decay_steps: int, warmup: int,
            num_steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(peak, decay_steps)


@SCHEDULES.register("piecewise")
def _piecewise(opt: Any, peak: float, decay_steps: int, warmup: int,
               num_steps: int) -> optax.Schedule:
    """×decay_factor at each of decay_boundaries (fractions of num_steps, warm-up included)."""
    boundaries = {
        max(int(b * num_steps) - warmup, 1): opt.decay_factor for b in opt.decay_boundaries}
    return optax.piecewise_constant_schedule(peak, boundaries)


@SCHEDULES.register("constant")
def _constant(opt: Any, peak: float, decay_steps: int, warmup: int,
              num_steps: int) -> optax.Schedule:
    return optax.constant_schedule(peak)


OPTIMIZERS.add("adagrad", lambda opt, schedule: optax.adagrad(schedule))
OPTIMIZERS.add("adam", lambda opt, schedule: optax.adam(schedule))
OPTIMIZERS.add("adamw", lambda opt, schedule: optax.adamw(schedule,
                                                          weight_decay=opt.weight_decay))
OPTIMIZERS.add("sgd", lambda opt, schedule: optax.sgd(schedule, momentum=opt.momentum,
                                                      nesterov=True))
# Optimisers that apply weight_decay themselves; the others get it added to the gradient.
DECOUPLED_DECAY = ("adamw",)
# As registered at import (the registries are the source of truth).
OPTIMIZER_NAMES = OPTIMIZERS.names()
SCHEDULE_NAMES = SCHEDULES.names()


def head_or_backbone(tree: dict[str, Any]) -> dict[str, Any]:
    """An encoder's parameter tree with each leaf labelled "head" (under HEAD_SCOPE) or
    "backbone"."""
    return {scope: jax.tree.map(lambda _, s=scope: "head" if s == HEAD_SCOPE else "backbone",
                                subtree) for scope, subtree in tree.items()}


def param_groups(params: dict[str, Any]) -> dict[str, Any]:
    """The train params {"encoder", "head"} labelled for `backbone_lr_multiplier`: the
    encoder's leaves by `head_or_backbone`, the objective's own parameters "head"."""
    return {"encoder": head_or_backbone(params["encoder"]),
            "head": jax.tree.map(lambda _: "head", params["head"])}


def keep_backbone_stats(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Batch statistics with the head's updated and the backbone's kept (a frozen backbone:
    backbone_lr_multiplier = 0)."""
    return {scope: new[scope] if scope == HEAD_SCOPE else old[scope] for scope in old}
