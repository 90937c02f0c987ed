"""Flax Linen face encoders: images [N, H, W, 3] in [0, 1] -> L2-normalised embeddings.

    model = create_model("small_cnn", embedding_dim=128, bn_axis_name="batch")
    variables = model.init(rng, images, train=False)          # {"params", "batch_stats"}
    embeddings, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    embeddings = model.apply(variables, images, train=False)   # running BN averages

Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16); the embeddings are
float32 whatever it is. With `bn_axis_name`, BatchNorm in training averages its batch statistics
over that mapped axis (global-batch BN under shard_map/pmap). A non-zero `dropout_rate` needs
`rngs={"dropout": key}` in `apply(..., train=True)`.

Encoders are registered by name where they are defined (registry.py: `register_encoder`); a new
encoder module is imported below.
"""

from __future__ import annotations

from facenet_jax.models.layers import DTYPES, INPUT_NORMS, l2_normalize
from facenet_jax.models.registry import (COMMON_FIELDS, ENCODERS, EncoderSpec, config_kwargs,
                                         create_model, default_fields, register_encoder,
                                         validate_model_config)
# Imported in the order the names are listed (registration order).
from facenet_jax.models.small_cnn import SmallCNN  # noqa: I001
from facenet_jax.models.resnet import RESNET_STAGES, BasicBlock, BottleneckBlock, ResNet
from facenet_jax.models.inception_resnet_v1 import InceptionResNetV1
from facenet_jax.models.iresnet import IRESNET_STAGES, IResNet
from facenet_jax.models.mobilefacenet import MobileFaceNet

# The names registered at import (the registry is the source of truth: `ENCODERS.names()`).
MODEL_NAMES = ENCODERS.names()

__all__ = ["COMMON_FIELDS", "DTYPES", "ENCODERS", "EncoderSpec", "MODEL_NAMES", "INPUT_NORMS",
           "config_kwargs", "create_model", "default_fields", "register_encoder",
           "validate_model_config", "SmallCNN",
           "ResNet", "BasicBlock", "BottleneckBlock", "InceptionResNetV1", "IRESNET_STAGES",
           "IResNet", "MobileFaceNet", "RESNET_STAGES", "l2_normalize"]
