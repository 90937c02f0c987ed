"""Cached backbone features (`config.model.cached_features`): a fine-tune whose backbone is
frozen computes the backbone's features of every training image and of its mirror once, in eval
mode (running BatchNorm statistics, as `model.init_from`'s encoder computes them), and trains
the embedding head (`optim.HEAD_SCOPE`) alone on them.

The train state keeps the whole encoder: the head trains through `FeatureHead`, a module that
is the encoder's own head under the same scope, so the state's parameter tree, its checkpoints
and everything that reads them (evaluate, embed, crossval) are those of the full encoder. The
backbone's parameters get zero gradients and `optimizer.backbone_lr_multiplier=0` (required)
leaves them and their BatchNorm statistics untouched, bit for bit. A sampled image's flip
selects its mirror's features; random crops cannot be cached and are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from facenet_jax import data, runfiles
from facenet_jax.eval.embed import make_embedder
from facenet_jax.models.layers import EmbeddingHead
from facenet_jax.optim import HEAD_SCOPE


def enabled(config: ml_collections.ConfigDict) -> bool:
    """`model.cached_features`: the head trains alone on cached backbone features."""
    return bool(config.model.cached_features)


def validate_cached_features(config: ml_collections.ConfigDict) -> None:
    """ValueError (one line, key and fix) unless `model.cached_features` is off or has what it
    needs: an encoder to take the frozen backbone from, a frozen backbone, no random crops."""
    if not enabled(config):
        if config.model.cached_features_dir is not None:
            raise ValueError("model.cached_features_dir stores the features of "
                             "model.cached_features=True: pass --config.model.cached_features"
                             "=True, or leave model.cached_features_dir unset")
        return
    if config.model.init_from is None:
        raise ValueError("model.cached_features=True caches the features of a trained backbone: "
                         "pass --config.model.init_from=DIR (or leave cached_features False)")
    if config.optimizer.backbone_lr_multiplier != 0:
        raise ValueError("model.cached_features=True trains the embedding head alone on a frozen "
                         "backbone: pass --config.optimizer.backbone_lr_multiplier=0 (got "
                         f"{config.optimizer.backbone_lr_multiplier})")
    if config.data.augment.crop_padding:
        raise ValueError("model.cached_features=True caches each image and its mirror only, not "
                         "random crops: pass --config.data.augment.crop_padding=0 (got "
                         f"{config.data.augment.crop_padding})")


def _is_head_call(context: Any) -> bool:
    """An interceptor's context is the call of the encoder's own embedding head."""
    module = context.module
    return (isinstance(module, EmbeddingHead) and context.method_name == "__call__"
            and module.scope is not None and module.scope.path == (HEAD_SCOPE,))


def _head_input(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """Interceptor: the head's input features in place of its output (the head is skipped)."""
    return args[0] if _is_head_call(context) else next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class BackboneFeatures:
    """An encoder cut before its embedding head: apply(variables, images [N,H,W,3] in [0, 1],
    train) -> the head's input features float32 [N, C] (inception_resnet_v1: the pooled
    1792-d features). Relies on the contract that every encoder returns its EmbeddingHead_0's
    output (tests/test_features_cache.py checks it for every registered encoder)."""

    encoder: nn.Module

    def apply(self, variables: Any, images: jax.Array, *, train: bool) -> jax.Array:
        with nn.intercept_methods(_head_input):
            return self.encoder.apply(variables, images, train=train)


class FeatureHead(nn.Module):
    """The encoder's embedding head on its own: features [N, C] -> unit [N, D], with the head's
    parameters and statistics under the encoder's scope (HEAD_SCOPE), so it applies to the
    full encoder's variables (the backbone's are ignored and get zero gradients).
    `head_fields`: the EmbeddingHead's fields (`head_fields_of`)."""

    head_fields: flax.core.FrozenDict

    @nn.compact
    def __call__(self, features: jax.Array, train: bool) -> jax.Array:
        return EmbeddingHead(**self.head_fields, name=HEAD_SCOPE)(features, train)


def head_fields_of(encoder: nn.Module, image_size: int) -> flax.core.FrozenDict:
    """The fields of `encoder`'s own EmbeddingHead (its width, dtype, BN axis and momentum,
    dropout, ...), read by tracing the encoder once (shapes only, nothing computed).
    ValueError when the encoder has no head under HEAD_SCOPE."""
    found = []

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        if _is_head_call(context):
            found.append({f.name: getattr(context.module, f.name)
                          for f in dataclasses.fields(EmbeddingHead)
                          if f.init and f.name not in ("parent", "name")})
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), np.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), images)
    if not found:
        raise ValueError(f"{type(encoder).__name__} has no embedding head under {HEAD_SCOPE}: "
                         "model.cached_features needs one")
    return flax.core.FrozenDict(found[0])


def image_and_mirror_features(encoder: nn.Module, variables: Any, images: np.ndarray,
                              mesh: jax.sharding.Mesh, *, batch_size: int) -> np.ndarray:
    """uint8 images [N,H,W,3] -> float32 [N, 2, C]: the backbone features (eval mode, running
    statistics) of each image ([:, 0]) and of its horizontal mirror ([:, 1], the flip of
    data.augment)."""
    embed = make_embedder(BackboneFeatures(encoder), mesh, batch_size=batch_size, flip=True,
                          flip_mode="concat")
    both = embed(variables, images)
    return both.reshape(len(images), 2, -1)


def backbone_key(encoder: nn.Module, variables: Any) -> str:
    """A hex digest of what an image's cached features depend on besides the image: the
    encoder's definition (its module fields) and its backbone's variables (the head's left
    out, so a trained head reuses its source's features)."""
    digest = hashlib.sha256(repr(encoder).encode())
    for path, leaf in jax.tree.leaves_with_path(jax.device_get(variables)):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.split("/")[1] != HEAD_SCOPE:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:32]


def stored_image_and_mirror_features(encoder: nn.Module, variables: Any, images: Any,
                                     mesh: jax.sharding.Mesh, *, batch_size: int,
                                     store: str | pathlib.Path) -> np.ndarray:
    """`image_and_mirror_features`, kept in the folder `store` across runs (e.g. the folds of
    a crossval, which share most of their training images): one file per image,
    STORE/<backbone_key>/<sha256 of the image's pixels>.npy [2, C]; only the images without
    one are computed (and written, atomically)."""
    folder = pathlib.Path(store) / backbone_key(encoder, variables)
    names = [hashlib.sha256(np.ascontiguousarray(images[i]).tobytes()).hexdigest()
             for i in range(len(images))]
    paths = [folder / f"{name}.npy" for name in names]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    logging.info("model.cached_features_dir: %d of %d images' features found in %s",
                 len(images) - len(missing), len(images), folder)
    if missing:
        computed = image_and_mirror_features(encoder, variables, images[np.asarray(missing)],
                                             mesh, batch_size=batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        for i, features in zip(missing, computed):
            runfiles.atomic_write_with(paths[i], lambda f, x=features: np.save(f, x))
    return np.stack([np.load(path) for path in paths])


def cached_training(config: ml_collections.ConfigDict, model: nn.Module,
                    eval_model: nn.Module, variables: Any, sampler: data.RowSampler,
                    mesh: jax.sharding.Mesh) -> tuple[CachedFeatureSampler, FeatureHead]:
    """What a run with model.cached_features trains with: the sampler of the training split's
    cached features (computed by `eval_model`, the encoder in eval mode, from `variables`,
    whose backbone is the frozen one) and the head to train on them (`model`'s, the encoder
    of the train step)."""
    images = sampler.dataset.images
    logging.info("model.cached_features: computing the backbone features of the %d training "
                 "images and their mirrors", len(images))
    start = time.perf_counter()
    store = config.model.cached_features_dir
    if store is None:
        features = image_and_mirror_features(eval_model, variables, images, mesh,
                                             batch_size=config.eval.batch_size)
    else:
        features = stored_image_and_mirror_features(eval_model, variables, images, mesh,
                                                    batch_size=config.eval.batch_size,
                                                    store=store)
    logging.info("model.cached_features: %d x 2 features of %d dimensions in %.0f s",
                 len(images), features.shape[-1], time.perf_counter() - start)
    head = FeatureHead(head_fields_of(model, config.data.image_size))
    return CachedFeatureSampler(sampler, features), head


class CachedFeatureSampler:
    """`sampler`'s batches with each sampled image replaced by its cached features: the same
    rows, labels and flip draws (a flipped row takes its mirror's features).
    host_batch(step, i, p) -> (float32 features [B/p, C], int32 labels [B/p])."""

    def __init__(self, sampler: data.RowSampler, features: np.ndarray):
        if sampler.augment.crop_padding:
            raise ValueError("cached features hold no random crops: data.augment.crop_padding "
                             "must be 0")
        if features.shape[:2] != (len(sampler.dataset.labels), 2):
            raise ValueError(f"features of shape {features.shape} do not fit the "
                             f"{len(sampler.dataset.labels)} images of the training split")
        self.sampler, self.features = sampler, features

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def replaced_images(self) -> int | None:
        return self.sampler.replaced_images

    def count_replaced(self, count: int) -> None:
        self.sampler.count_replaced(count)

    def host_batch(self, step: int, process_index: int, process_count: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [i·B/p, (i+1)·B/p) of step's global batch, for process i of p."""
        rows, _, flips = self.sampler.plan(step)
        per_process = len(rows) // process_count
        mine = slice(process_index * per_process, (process_index + 1) * per_process)
        return (self.features[rows[mine], flips[mine].astype(np.intp)],
                self.sampler.dataset.labels[rows[mine]])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole global batch of `step`."""
        return self.host_batch(step, 0, 1)
