"""What every encoder shares: input checks, BatchNorm with global statistics, the embedding head."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax.losses.distances import l2_normalize

Dtype = Any


def check_images(images: jax.Array, *, min_size: int, model_name: str) -> None:
    """Raises ValueError unless `images` is float [N, H, W, 3] with H, W >= `min_size`.

    Runs at trace time (shapes are static), so bad input fails before any compilation.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{model_name} expects images of shape [N, H, W, 3] (RGB, channels last), got "
            f"{images.shape}; add a batch axis or convert grey images to RGB first")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"{model_name} expects float images in [0, 1], got dtype {images.dtype}; "
            f"divide uint8 images by 255 first")
    height, width = images.shape[1:3]
    if min(height, width) < min_size:
        raise ValueError(
            f"{model_name} needs images of at least {min_size}x{min_size} px, got "
            f"{height}x{width}; resize the inputs (config.data.image_size) or choose a "
            f"model with fewer downsampling steps")


# How an encoder maps its [0, 1] input pixels before the first layer (`config.model.input_norm`):
# "symmetric": 2x - 1, in [-1, 1] (what the project's own models train with);
# "fixed_standardization": (255x - 127.5) / 128, what davidsandberg's FaceNet weights (and
# facenet-pytorch's copies of them) expect.
INPUT_NORMS = ("symmetric", "fixed_standardization")
# The compute dtypes `config.model.dtype` may name (parameters stay float32).
DTYPES = ("float32", "bfloat16")


def to_model_input(images: jax.Array, dtype: Dtype, input_norm: str = "symmetric") -> jax.Array:
    """[N, H, W, 3] in [0, 1] -> the same mapped by `input_norm` (INPUT_NORMS), compute dtype."""
    x = images.astype(jnp.float32)
    if input_norm == "symmetric":
        x = x * 2.0 - 1.0
    elif input_norm == "fixed_standardization":
        x = (x * 255.0 - 127.5) / 128.0
    else:
        raise ValueError(f"unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
    return x.astype(dtype)


def batch_norm(*, train: bool, dtype: Dtype, axis_name: str | None, momentum: float,
               epsilon: float, use_scale: bool = True) -> Callable[..., nn.Module]:
    """A BatchNorm factory: float32 parameters and statistics, compute in `dtype`.

    With `axis_name`, training averages the batch statistics over that mapped axis (global-batch
    BN under shard_map/pmap); eval (train=False) uses the running averages and no collective.
    """
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon,
        use_scale=use_scale, dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name)


class EmbeddingHead(nn.Module):
    """Pooled features [N, C] -> L2-normalised embeddings [N, embedding_dim] (float32).

    dropout -> linear (no bias when BN follows) -> optional BN -> L2 normalisation in float32.
    """

    embedding_dim: int
    dtype: Dtype
    bn_axis_name: str | None
    dropout_rate: float = 0.0
    use_bn: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_use_scale: bool = True

    @nn.compact
    def __call__(self, features: jax.Array, train: bool) -> jax.Array:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        x = nn.Dense(self.embedding_dim, use_bias=not self.use_bn, dtype=self.dtype,
                     param_dtype=jnp.float32, name="embedding")(x)
        if self.use_bn:
            x = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                           momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                           use_scale=self.bn_use_scale)(name="embedding_bn")(x)
        return l2_normalize(x)


class PReLU(nn.Module):
    """Per-channel parametric ReLU (He et al. 2015): [..., C] -> max(x, 0) + a_c · min(x, 0).

    One float32 slope per channel (last axis), initialised to `slope_init` (0.25, as PyTorch's
    nn.PReLU and insightface's face backbones); the product runs in the input's dtype.
    """

    slope_init: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("negative_slope", nn.initializers.constant(self.slope_init),
                           (x.shape[-1],), jnp.float32)
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)
