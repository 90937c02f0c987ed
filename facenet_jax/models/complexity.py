"""Model size and cost from tracing alone (no compile): parameters and multiply-accumulates.

MACs are what papers and insightface's `flops.py` (ptflops) call "FLOPs": one multiply-add per
weight use in the convolutions and matrix products. Element-wise work (BN, activations) is not
counted. Used for the encoder tables in docs/architecture.md and their tests.

    python -c "from facenet_jax.models import complexity as c, iresnet as m; \
        print(c.encoder_complexity(m.iresnet50(), 112))"
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or of ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _equation_macs(eqn: Any) -> int:
    if eqn.primitive.name == "conv_general_dilated":
        # The kernel holds in/groups inputs per output channel: each output value uses
        # prod(kernel shape) / out_channels of its weights once.
        kernel = eqn.invars[1].aval.shape
        out_channels = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // out_channels
    if eqn.primitive.name == "dot_general":
        (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contracting)
    return 0


def count_macs(jaxpr: Any) -> int:
    """Multiply-accumulates of the convolutions and dot products in a (closed) jaxpr.

    Nested jaxprs (jit, remat, custom derivatives, control flow bodies once each) are included.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += _equation_macs(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
                    total += count_macs(sub)
    return total


def encoder_complexity(model: nn.Module, image_size: int) -> dict[str, int]:
    """{"params": trainable scalars, "macs": per image in eval mode} for an encoder at
    `image_size` px; traced, never compiled, so a 100-layer net costs seconds on a CPU."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    return {"params": count_params(variables["params"]), "macs": count_macs(jaxpr)}
