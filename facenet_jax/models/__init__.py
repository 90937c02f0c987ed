"""Flax Linen face encoders: images [N, H, W, 3] in [0, 1] -> L2-normalised embeddings.

    model = create_model("small_cnn", embedding_dim=128, bn_axis_name="batch")
    variables = model.init(rng, images, train=False)          # {"params", "batch_stats"}
    embeddings, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    embeddings = model.apply(variables, images, train=False)   # running BN averages

Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16); the embeddings are
float32 whatever it is. With `bn_axis_name`, BatchNorm in training averages its batch statistics
over that mapped axis (global-batch BN under shard_map/pmap).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facenet_jax.models.inception_resnet_v1 import InceptionResNetV1
from facenet_jax.models.layers import INPUT_NORMS, l2_normalize
from facenet_jax.models.resnet import RESNET_STAGES, BasicBlock, BottleneckBlock, ResNet
from facenet_jax.models.small_cnn import SmallCNN

MODEL_NAMES = ("small_cnn", "resnet18", "resnet34", "resnet50", "inception_resnet_v1")

__all__ = ["MODEL_NAMES", "INPUT_NORMS", "create_model", "SmallCNN", "ResNet", "BasicBlock",
           "BottleneckBlock", "InceptionResNetV1", "l2_normalize"]


def create_model(name: str, *, embedding_dim: int = 128, dtype: Any = jnp.float32,
                 bn_axis_name: str | None = None, **kwargs: Any) -> nn.Module:
    """The encoder called `name`; `kwargs` go to its module (e.g. small_cnn's `widths`).

    Raises ValueError for an unknown name, listing MODEL_NAMES.
    """
    common = dict(embedding_dim=embedding_dim, dtype=dtype, bn_axis_name=bn_axis_name)
    if name == "small_cnn":
        return SmallCNN(**common, **kwargs)
    if name in RESNET_STAGES:
        stage_sizes, block = RESNET_STAGES[name]
        return ResNet(stage_sizes=stage_sizes, block=block, model_name=name, **common,
                      **kwargs)
    if name == "inception_resnet_v1":
        return InceptionResNetV1(**common, **kwargs)
    raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
