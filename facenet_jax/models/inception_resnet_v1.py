"""Inception-ResNet-v1 (Szegedy et al. 2016) as in davidsandberg/facenet's best-known model.

Stem -> 5× block35 -> reduction A -> 10× block17 -> reduction B -> 5× block8 (+ one final block8
without activation, unscaled) -> global average pool -> dropout -> linear bottleneck (no bias)
-> BN -> L2 normalisation. Branch widths follow facenet's TF-slim model (reduction A with
k, l, m, n = 192, 192, 256, 384). As there, every conv is followed by a BatchNorm with a learned
offset and no scale (TF-slim's default; momentum 0.995, epsilon 1e-3) and ReLU, except the
1×1 up-projection of each residual branch, which has a bias and no BN. At 160 px the maps are
17 px (block35), 8 px (block17) and 3 px (block8); the smallest input it accepts is 75 px.
`bn_scale=True` gives every BatchNorm a learned scale too, as in facenet-pytorch's
`InceptionResnetV1` (affine BNs), so its converted weights (`facenet_jax.pretrained`) compute
exactly what they compute there.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax.models.layers import (Dtype, EmbeddingHead, batch_norm, check_images,
                                       to_model_input)
from facenet_jax.models.registry import register_encoder

MIN_IMAGE_SIZE = 75  # every VALID stride-2 stage still leaves at least 1 px


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, (H-3)//2+1, (W-3)//2+1, C]."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class ConvBN(nn.Module):
    """Conv (no bias) -> BN -> ReLU: TF-slim's conv2d with batch_norm."""

    features: int
    kernel: tuple[int, int]
    norm: Callable[..., nn.Module]
    dtype: Dtype
    stride: int = 1
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=self.padding,
                    use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)(x)
        return nn.relu(self.norm()(x))


class InceptionResidual(nn.Module):
    """x [N, H, W, C] -> act(x + scale · up(concat(branches(x)))): block35/17/8.

    `branches` lists each branch as a tuple of (features, kernel) convs applied in order.
    """

    branches: tuple[tuple[tuple[int, tuple[int, int]], ...], ...]
    scale: float
    activate: bool
    norm: Callable[..., nn.Module]
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        outputs = []
        for branch in self.branches:
            y = x
            for features, kernel in branch:
                y = ConvBN(features, kernel, self.norm, self.dtype)(y)
            outputs.append(y)
        up = nn.Conv(x.shape[-1], (1, 1), use_bias=True, dtype=self.dtype,
                     param_dtype=jnp.float32, name="up")(jnp.concatenate(outputs, axis=-1))
        x = x + self.scale * up
        return nn.relu(x) if self.activate else x


BLOCK35 = (((32, (1, 1)),),
           ((32, (1, 1)), (32, (3, 3))),
           ((32, (1, 1)), (32, (3, 3)), (32, (3, 3))))
BLOCK17 = (((128, (1, 1)),),
           ((128, (1, 1)), (128, (1, 7)), (128, (7, 1))))
BLOCK8 = (((192, (1, 1)),),
          ((192, (1, 1)), (192, (1, 3)), (192, (3, 1))))


# bn_scale stays the top-level config.model.bn_scale (older than the blocks; imported weights
# set it); a block can remove a stage's repeated blocks entirely (0).
@register_encoder("inception_resnet_v1", top_level=("bn_scale",),
                  zero_ok=("block35_repeats", "block17_repeats", "block8_repeats"))
class InceptionResNetV1(nn.Module):
    """images [N, H, W, 3] in [0, 1], H, W >= 75 (160 native) -> unit [N, embedding_dim] float32.

    `dropout_rate` is applied before the bottleneck in training (facenet used 0.2, i.e. keep
    probability 0.8); a non-zero rate needs `rngs={"dropout": key}` in `apply(..., train=True)`.
    """

    embedding_dim: int = 128
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.995
    dropout_rate: float = 0.0
    block35_repeats: int = 5
    block17_repeats: int = 10
    block8_repeats: int = 5
    bn_scale: bool = False  # True: affine BNs (facenet-pytorch's layout)
    input_norm: str = "symmetric"  # layers.INPUT_NORMS

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        check_images(images, min_size=MIN_IMAGE_SIZE, model_name="inception_resnet_v1")
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                          momentum=self.bn_momentum, epsilon=1e-3, use_scale=self.bn_scale)

        def conv(features: int, kernel: tuple[int, int], stride: int = 1,
                 padding: str = "SAME") -> ConvBN:
            return ConvBN(features, kernel, norm, self.dtype, stride, padding)

        x = to_model_input(images, self.dtype, self.input_norm)
        # Stem: 160 -> 79 -> 77 -> 77 -> 38 -> 38 -> 36 -> 17 px.
        x = conv(32, (3, 3), 2, "VALID")(x)
        x = conv(32, (3, 3), 1, "VALID")(x)
        x = conv(64, (3, 3))(x)
        x = max_pool_3x3_s2(x)
        x = conv(80, (1, 1), 1, "VALID")(x)
        x = conv(192, (3, 3), 1, "VALID")(x)
        x = conv(256, (3, 3), 2, "VALID")(x)

        for _ in range(self.block35_repeats):
            x = InceptionResidual(BLOCK35, 0.17, True, norm, self.dtype)(x)
        # Reduction A: 17 -> 8 px, 256 -> 384 + 256 + 256 = 896 channels.
        x = jnp.concatenate([
            conv(384, (3, 3), 2, "VALID")(x),
            conv(256, (3, 3), 2, "VALID")(conv(192, (3, 3))(conv(192, (1, 1))(x))),
            max_pool_3x3_s2(x),
        ], axis=-1)

        for _ in range(self.block17_repeats):
            x = InceptionResidual(BLOCK17, 0.10, True, norm, self.dtype)(x)
        # Reduction B: 8 -> 3 px, 896 -> 384 + 256 + 256 + 896 = 1792 channels.
        x = jnp.concatenate([
            conv(384, (3, 3), 2, "VALID")(conv(256, (1, 1))(x)),
            conv(256, (3, 3), 2, "VALID")(conv(256, (1, 1))(x)),
            conv(256, (3, 3), 2, "VALID")(conv(256, (3, 3))(conv(256, (1, 1))(x))),
            max_pool_3x3_s2(x),
        ], axis=-1)

        for _ in range(self.block8_repeats):
            x = InceptionResidual(BLOCK8, 0.20, True, norm, self.dtype)(x)
        x = InceptionResidual(BLOCK8, 1.0, False, norm, self.dtype)(x)

        features = jnp.mean(x, axis=(1, 2))
        return EmbeddingHead(self.embedding_dim, self.dtype, self.bn_axis_name,
                             dropout_rate=self.dropout_rate, use_bn=True,
                             bn_momentum=self.bn_momentum, bn_epsilon=1e-3,
                             bn_use_scale=self.bn_scale)(features, train)
