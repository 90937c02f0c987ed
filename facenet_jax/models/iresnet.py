"""IR-ResNets (insightface's `iresnet50`, `iresnet100`): the ArcFace backbones at 112 px.

Deng et al. 2019 (ArcFace), layout as in insightface's arcface_torch `backbones/iresnet.py`:
a 3×3 stride-1 stem (conv 64 -> BN -> PReLU), four stages of improved-residual blocks
(BN -> conv3×3 -> BN -> PReLU -> conv3×3 (stride) -> BN, plus identity or a strided 1×1 conv + BN
shortcut; no activation after the sum), each stage opening with a stride-2 block:
112 -> 56 -> 28 -> 14 -> 7 px. The output layer is BN -> flatten (7·7·512 values at 112 px)
-> dropout -> linear -> BN -> our L2 normalisation. Every PReLU has one slope per channel.

Convolution weights start He-normal (fan-out, as in torchvision and insightface's MobileFaceNet),
not insightface's N(0, 0.1²): with that, every 3×3 conv multiplies the activations' scale by
2.4-6.8, and an untrained iresnet50 in eval mode (running averages still 0 and 1) reaches
~1e26 before the embedding, whose squared norm overflows float32: all-zero embeddings, so a
step-0 evaluation saw nothing. With He init the untrained iresnet100 stays below ~1e11.

Two deliberate differences from the PyTorch model, neither changing what it computes:
- the embedding linear layer has no bias: the BN after it subtracts the batch mean, so a bias
  there is redundant (insightface keeps one: 512 parameters);
- the embedding BN's scale is fixed at 1 by having none (insightface keeps a frozen weight of
  ones: 512 more values that are not trained).
Flattening is channels-last ([H, W, C] order, PyTorch's is [C, H, W]); a converter of
insightface weights must permute the linear layer's input axis. The flattened size, and with it
the linear layer, depends on the input size (7·7 maps at 112 px, as published).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax.models.layers import (Dtype, EmbeddingHead, PReLU, batch_norm, check_images,
                                       to_model_input)
from facenet_jax.models.registry import create_model, register_encoder

IRESNET_STAGES = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    """[N, H, W, C] -> [N, H/stride, W/stride, width]: insightface's improved residual block."""

    width: int
    stride: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    prelu_init: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.width, 3, 1)(self.norm()(x))
        y = PReLU(self.prelu_init)(self.norm()(y))
        # The stride sits on the second conv, so the first still sees the full-resolution map.
        y = self.norm()(self.conv(self.width, 3, self.stride)(y))
        if self.stride != 1 or x.shape[-1] != self.width:
            x = self.norm()(self.conv(self.width, 1, self.stride)(x))
        return y + x


class IResNet(nn.Module):
    """images [N, H, W, 3] in [0, 1] -> unit embeddings [N, embedding_dim] float32.

    Defaults are insightface's; `stage_sizes` picks the depth (IRESNET_STAGES).
    """

    stage_sizes: Sequence[int] = IRESNET_STAGES["iresnet50"]
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    embedding_dim: int = 512
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9  # PyTorch's momentum 0.1
    bn_epsilon: float = 1e-5
    prelu_init: float = 0.25
    # Insightface freezes the embedding BN's scale at 1; False learns one.
    fixed_embedding_scale: bool = True
    dropout_rate: float = 0.0  # before the embedding layer (insightface's `dropout`, 0)
    input_norm: str = "symmetric"  # layers.INPUT_NORMS; insightface's (x - 0.5) / 0.5
    model_name: str = "iresnet"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        if len(self.stage_sizes) != len(self.widths) or min(self.stage_sizes, default=0) < 1:
            raise ValueError(
                f"{self.model_name}: stage_sizes {tuple(self.stage_sizes)} and widths "
                f"{tuple(self.widths)} need one entry per stage and at least one block each")
        check_images(images, min_size=2 ** len(self.stage_sizes), model_name=self.model_name)
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                          momentum=self.bn_momentum, epsilon=self.bn_epsilon)

        def conv(width: int, kernel: int, stride: int) -> nn.Module:
            # PyTorch's symmetric padding (not SAME's, which pads stride-2 convs on one side
            # only), so a stride-2 conv samples the same pixels as insightface's.
            pad = (kernel - 1) // 2
            return nn.Conv(width, (kernel, kernel), strides=stride, padding=((pad, pad),) * 2,
                           use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=nn.initializers.variance_scaling(2.0, "fan_out",
                                                                        "normal"))

        x = to_model_input(images, self.dtype, self.input_norm)
        x = PReLU(self.prelu_init)(norm()(conv(self.stem_width, 3, 1)(x)))
        for num_blocks, width in zip(self.stage_sizes, self.widths):
            for index in range(num_blocks):
                x = IBasicBlock(width, 2 if index == 0 else 1, conv, norm, self.prelu_init)(x)
        features = norm()(x).reshape(x.shape[0], -1)
        return EmbeddingHead(self.embedding_dim, self.dtype, self.bn_axis_name,
                             dropout_rate=self.dropout_rate, use_bn=True,
                             bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                             bn_use_scale=not self.fixed_embedding_scale)(features, train)


for _name, _stages in IRESNET_STAGES.items():
    register_encoder(_name, fixed={"model_name": _name}, stage_sizes=_stages)(IResNet)


def iresnet50(**fields: Any) -> IResNet:
    """insightface's r50 (512-d unless `embedding_dim` says otherwise): 43.6 M parameters,
    6.3 GMACs at 112 px; fields override the registered defaults."""
    return create_model("iresnet50", **{"embedding_dim": 512, **fields})


def iresnet100(**fields: Any) -> IResNet:
    """insightface's r100 (512-d unless `embedding_dim` says otherwise): 65.2 M parameters,
    12.1 GMACs at 112 px; fields override the registered defaults."""
    return create_model("iresnet100", **{"embedding_dim": 512, **fields})
