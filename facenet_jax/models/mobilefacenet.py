"""MobileFaceNet (Chen et al. 2018) as insightface's arcface_torch `mbf` builds it, at 112 px.

Stem conv 3×3 stride 2 -> a grouped 3×3 conv (stage 0) -> three stages, each opening with a
stride-2 inverted-residual block and followed by residual ones (MobileNetV2 bottlenecks: 1×1
expand -> depthwise 3×3 -> linear 1×1 project, BN after each, PReLU after the first two)
-> 1×1 conv to 512 -> linear global depthwise conv (GDConv: one kernel spanning the whole 7×7
map) -> BN -> flatten -> linear embedding (no bias) -> BN -> our L2 normalisation.
112 -> 56 -> 28 -> 14 -> 7 px.

Widths as in insightface: stage widths 64, 64, 128, 128 times `scale` (insightface's default
mbf has scale 2), while the blocks' inner (expanded) widths are absolute, not scaled. With
`scale=1, embedding_dim=128` this is exactly the paper's table (expansions 2, 4, 2, 4, 2;
the stage-0 conv depthwise): 221 M MACs and the paper's 0.99 M parameters (1.00 M counting
every BN and PReLU parameter). The default (`scale=2`, 512-d) is insightface's
"mobilefacenet-0.45G"; its `get_mbf_large` is `scale=4, stage_sizes=(2, 8, 12, 4)`.

The GDConv kernel is sized to the final map (7×7 at 112 px, as published), so it stays global
at other input sizes; its parameters then change with the input size.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax.models.layers import (Dtype, EmbeddingHead, PReLU, batch_norm, check_images,
                                       to_model_input)
from facenet_jax.models.registry import create_model, register_encoder


class ConvUnit(nn.Module):
    """Conv (no bias, PyTorch's symmetric padding) -> BN -> optional per-channel PReLU.

    [N, H, W, C] -> [N, H', W', features]; `kernel` None spans the whole map (VALID, 1×1 out).
    """

    features: int
    kernel: int | None
    norm: Callable[..., nn.Module]
    dtype: Dtype
    stride: int = 1
    groups: int = 1
    activate: bool = True
    prelu_init: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel is None:
            kernel, padding = tuple(x.shape[1:3]), "VALID"
        else:
            pad = (self.kernel - 1) // 2
            kernel, padding = (self.kernel, self.kernel), ((pad, pad),) * 2
        x = nn.Conv(self.features, kernel, strides=self.stride, padding=padding,
                    feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))(x)
        x = self.norm()(x)
        return PReLU(self.prelu_init)(x) if self.activate else x


class InvertedResidual(nn.Module):
    """1×1 expand to `inner` -> depthwise 3×3 (stride) -> linear 1×1 to `features` (+ x).

    [N, H, W, C] -> [N, H/stride, W/stride, features]; the identity shortcut only where the
    shape is kept (insightface's `Residual` blocks), none on the stride-2 blocks.
    """

    features: int
    inner: int
    stride: int
    unit: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.unit(self.inner, 1)(x)
        y = self.unit(self.inner, 3, stride=self.stride, groups=self.inner)(y)
        y = self.unit(self.features, 1, activate=False)(y)
        return y + x if self.stride == 1 and x.shape[-1] == self.features else y


@register_encoder("mobilefacenet", zero_ok=("stage_sizes",))
class MobileFaceNet(nn.Module):
    """images [N, H, W, 3] in [0, 1] -> unit embeddings [N, embedding_dim] float32.

    Stage i works at `widths[i] * scale` channels. Stage 0 is a single 3×3 conv in
    `stem_groups` groups when `stage_sizes[0]` is 1, else that many residual blocks; stages 1-3
    open with a stride-2 block of inner width `down_inner_widths[i - 1]`, followed by
    `stage_sizes[i]` residual blocks (insightface's `blocks`). Residual blocks of stage i
    expand to `residual_inner_widths[i]`.
    """

    embedding_dim: int = 512
    scale: int = 2
    stage_sizes: Sequence[int] = (1, 4, 6, 2)
    widths: Sequence[int] = (64, 64, 128, 128)
    down_inner_widths: Sequence[int] = (128, 256, 512)
    residual_inner_widths: Sequence[int] = (128, 128, 256, 256)
    stem_groups: int = 64
    feature_width: int = 512
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9  # PyTorch's momentum 0.1
    bn_epsilon: float = 1e-5
    prelu_init: float = 0.25
    dropout_rate: float = 0.0  # before the embedding layer (insightface has none)
    input_norm: str = "symmetric"  # layers.INPUT_NORMS; insightface's (x - 0.5) / 0.5

    def _check_fields(self) -> None:
        lengths = (len(self.stage_sizes), len(self.widths), len(self.down_inner_widths) + 1,
                   len(self.residual_inner_widths))
        if lengths != (4, 4, 4, 4) or min(self.stage_sizes) < 0:
            raise ValueError(
                f"mobilefacenet needs 4 stage_sizes (each >= 0), 4 widths, 3 down_inner_widths "
                f"and 4 residual_inner_widths; got {tuple(self.stage_sizes)}, "
                f"{tuple(self.widths)}, {tuple(self.down_inner_widths)}, "
                f"{tuple(self.residual_inner_widths)}")
        if self.stage_sizes[0] == 1 and (self.widths[0] * self.scale) % self.stem_groups:
            raise ValueError(
                f"mobilefacenet: stem_groups {self.stem_groups} must divide the stage-0 width "
                f"{self.widths[0] * self.scale} (widths[0] * scale)")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        self._check_fields()
        check_images(images, min_size=16, model_name="mobilefacenet")  # four stride-2 steps
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                          momentum=self.bn_momentum, epsilon=self.bn_epsilon)
        def unit(features: int, kernel: int | None, **options: Any) -> nn.Module:
            return ConvUnit(features, kernel, norm, self.dtype, prelu_init=self.prelu_init,
                            **options)

        widths = [width * self.scale for width in self.widths]
        x = to_model_input(images, self.dtype, self.input_norm)
        x = unit(widths[0], 3, stride=2)(x)
        if self.stage_sizes[0] == 1:
            x = unit(widths[0], 3, groups=self.stem_groups)(x)
        else:
            for _ in range(self.stage_sizes[0]):
                x = InvertedResidual(widths[0], self.residual_inner_widths[0], 1, unit)(x)
        for stage in range(1, 4):
            x = InvertedResidual(widths[stage], self.down_inner_widths[stage - 1], 2, unit)(x)
            for _ in range(self.stage_sizes[stage]):
                x = InvertedResidual(widths[stage], self.residual_inner_widths[stage], 1,
                                     unit)(x)
        x = unit(self.feature_width, 1)(x)
        x = unit(self.feature_width, None, groups=self.feature_width, activate=False)(x)
        return EmbeddingHead(self.embedding_dim, self.dtype, self.bn_axis_name,
                             dropout_rate=self.dropout_rate, use_bn=True,
                             bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)(
            x.reshape(x.shape[0], -1), train)


def mobilefacenet(**fields: Any) -> MobileFaceNet:
    """insightface's mbf (scale 2, 512-d): 2.06 M parameters, 0.44 GMACs at 112 px (its README's
    "mobilefacenet-0.45G"); fields override the defaults."""
    return create_model("mobilefacenet", **{"embedding_dim": 512, **fields})
