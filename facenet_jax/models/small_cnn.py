"""SmallCNN: the CPU default, a few conv-BN-ReLU stages, global average pool, linear embedding."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from facenet_jax.models.layers import (Dtype, EmbeddingHead, batch_norm, check_images,
                                       to_model_input)
from facenet_jax.models.registry import register_encoder


@register_encoder("small_cnn")
class SmallCNN(nn.Module):
    """images [N, H, W, 3] in [0, 1] -> unit embeddings [N, embedding_dim] float32.

    Stage i is `convs_per_stage` 3×3 conv-BN-ReLU layers of `widths[i]` channels whose first
    conv has stride 2 (`first_stride` for stage 0). The defaults take 32 px to 16, 8, 4, 2 px
    maps: each conv sees 4× fewer pixels than its input, which keeps a batch of 128 at 32 px
    fast on a 2-core CPU while the receptive field still spans the whole face.
    """

    embedding_dim: int = 128
    widths: Sequence[int] = (16, 32, 64, 128)
    convs_per_stage: int = 1
    first_stride: int = 2
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dropout_rate: float = 0.0
    input_norm: str = "symmetric"  # layers.INPUT_NORMS

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        check_images(images, min_size=self.first_stride * 2 ** (len(self.widths) - 1),
                     model_name="small_cnn")
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                          momentum=self.bn_momentum, epsilon=1e-5)
        x = to_model_input(images, self.dtype, self.input_norm)
        for stage, width in enumerate(self.widths):
            for layer in range(self.convs_per_stage):
                stride = 1 if layer else (self.first_stride if stage == 0 else 2)
                x = nn.Conv(width, (3, 3), strides=stride, padding="SAME", use_bias=False,
                            dtype=self.dtype, param_dtype=jnp.float32)(x)
                x = nn.relu(norm()(x))
        features = jnp.mean(x, axis=(1, 2))
        return EmbeddingHead(self.embedding_dim, self.dtype, self.bn_axis_name,
                             dropout_rate=self.dropout_rate)(features, train)
