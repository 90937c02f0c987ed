"""ResNet-18/34/50 for face crops (112 or 160 px), after ArcFace's IR-ResNets.

The ImageNet stem (7×7 stride-2 conv + max-pool) takes a 112 px face to 28 px before the first
residual stage and to 4 px at the end. Face encoders instead keep a 3×3 stride-1 stem without
max-pool and downsample at the first block of every stage, as in ArcFace (Deng et al. 2019):
112 -> 56 -> 28 -> 14 -> 7 px (160 -> 80 -> 40 -> 20 -> 10). Blocks are the standard
post-activation ones (He et al. 2016) with ReLU; each residual branch ends in a BN whose scale
starts at zero (Goyal et al. 2017), so every block starts as the identity. Global average pooling
(not ArcFace's flatten) keeps the head independent of the input size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax.models.layers import (Dtype, EmbeddingHead, batch_norm, check_images,
                                       to_model_input)
from facenet_jax.models.registry import register_encoder

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3×3 convs; [N, H, W, C] -> [N, H/stride, W/stride, width]."""

    width: int
    stride: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm()(self.conv(self.width, (3, 3), self.stride)(x)))
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.width, (3, 3), 1)(y))
        return nn.relu(y + shortcut(x, y.shape[-1], self.stride, self.conv, self.norm))


class BottleneckBlock(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4; [N, H, W, C] -> [N, H/s, W/s, 4·width]."""

    width: int
    stride: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm()(self.conv(self.width, (1, 1), 1)(x)))
        y = nn.relu(self.norm()(self.conv(self.width, (3, 3), self.stride)(y)))
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(4 * self.width, (1, 1), 1)(y))
        return nn.relu(y + shortcut(x, y.shape[-1], self.stride, self.conv, self.norm))


def shortcut(x: jax.Array, width: int, stride: int, conv: Callable[..., nn.Module],
             norm: Callable[..., nn.Module]) -> jax.Array:
    """Identity, or a strided 1×1 conv + BN projection when the shape changes."""
    if x.shape[-1] == width and stride == 1:
        return x
    return norm()(conv(width, (1, 1), stride)(x))


class ResNet(nn.Module):
    """images [N, H, W, 3] in [0, 1] -> unit embeddings [N, embedding_dim] float32."""

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    embedding_dim: int = 128
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    head_bn: bool = True
    dropout_rate: float = 0.0
    input_norm: str = "symmetric"  # layers.INPUT_NORMS
    model_name: str = "resnet"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        check_images(images, min_size=2 ** len(self.stage_sizes), model_name=self.model_name)
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                          momentum=self.bn_momentum, epsilon=1e-5)

        def conv(width: int, kernel: tuple[int, int], stride: int) -> nn.Module:
            return nn.Conv(width, kernel, strides=stride, padding="SAME", use_bias=False,
                           dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=nn.initializers.variance_scaling(2.0, "fan_out",
                                                                        "normal"))

        x = to_model_input(images, self.dtype, self.input_norm)
        x = nn.relu(norm()(conv(STAGE_WIDTHS[0], (3, 3), 1)(x)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = self.block(STAGE_WIDTHS[stage], 2 if index == 0 else 1, conv, norm)(x)
        features = jnp.mean(x, axis=(1, 2))
        if self.head_bn:
            features = norm()(features)
        return EmbeddingHead(self.embedding_dim, self.dtype, self.bn_axis_name,
                             dropout_rate=self.dropout_rate)(features, train)


RESNET_STAGES = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), BottleneckBlock),
}

for _name, (_stages, _block) in RESNET_STAGES.items():
    register_encoder(_name, fixed={"block": _block, "model_name": _name},
                     stage_sizes=_stages)(ResNet)
