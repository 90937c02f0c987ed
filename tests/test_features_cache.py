"""model.cached_features: a frozen backbone's features of each training image and its mirror,
computed once in eval mode, and the embedding head trained alone on them.

References: the full encoder in eval mode (the backbone cut + the head must compose to it, for
every registered encoder); for a training step, small_cnn's features rebuilt from its last
BatchNorm's captured output, its head (a Dense + L2 normalisation) written out, the loss from
the numpy TF-Addons transcription, the SGD update by hand; the checkpoint's backbone against the
source's bit for bit."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from triplet_reference import tfa_semihard_loss

from facenet_jax import checkpoints, data, features_cache, finetune, models, parallel, runfiles
from facenet_jax import config as cfg
from facenet_jax import train
from facenet_jax.logs import read_metrics
from facenet_jax.losses import triplet_loss
from facenet_jax.models.inception_resnet_v1 import InceptionResNetV1
from facenet_jax.optim import HEAD_SCOPE
from facenet_jax.state import build_model, build_optimizer, create_train_state
from facenet_jax.train.validate import validate_run_config

DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
# 8 test devices (conftest): P and the eval batch divide by 8.
TINY = {"num_steps": 2, "checkpoint_every": 2, "eval_every": 100, "log_every": 1,
        "data.image_size": 16, "data.synthetic.num_identities": 40,
        "data.synthetic.images_per_identity": 3, "batch.identities": 8,
        "batch.images_per_identity": 2, "data.pairs.pairs_per_fold": 5, "eval.batch_size": 64,
        "model.embedding_dim": 16, "optimizer.schedule": "constant"}
# A small variant of each encoder module, and an image size it takes.
SMALL = {
    "small_cnn": (models.create_model("small_cnn", embedding_dim=8, widths=(8, 16)), 16),
    "resnet18": (models.create_model("resnet18", embedding_dim=8, stage_sizes=(1, 1, 1, 1)), 32),
    "inception_resnet_v1": (models.create_model(
        "inception_resnet_v1", embedding_dim=8, block35_repeats=0, block17_repeats=0,
        block8_repeats=0, bn_scale=True), 75),
    "iresnet50": (models.create_model("iresnet50", embedding_dim=8, stage_sizes=(1, 1, 1, 1),
                                      widths=(8, 8, 16, 16), stem_width=8), 32),
    "mobilefacenet": (models.create_model(
        "mobilefacenet", embedding_dim=8, scale=1, stage_sizes=(1, 1, 1, 1),
        widths=(8, 8, 16, 16), down_inner_widths=(16, 32, 64),
        residual_inner_widths=(16, 16, 32, 32), stem_groups=8, feature_width=32), 32),
}
CACHED = {"model.cached_features": True, "optimizer.backbone_lr_multiplier": 0.0,
          "data.augment.crop_padding": 0}


def _random_variables(model, size, seed=0):
    """Initial variables with every BN statistic and parameter moved at random (so eval mode,
    train mode and the head's own BN all compute something distinct)."""
    init = jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((2, size, size, 3)),
                                      train=False))
    # The moves are drawn on the host: a jitted draw per leaf compiles for seconds.
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(
        lambda leaf: leaf + 0.1 * np.abs(rng.standard_normal(leaf.shape, np.float32)), init())


def test_every_registered_encoder_module_has_a_small_variant_here():
    modules = {type(models.create_model(name)) for name in models.ENCODERS.names()}
    assert modules == {type(model) for model, _ in SMALL.values()}


@pytest.mark.parametrize("name", [  # the fast tier: small_cnn; the bigger modules compile longer
    pytest.param(name, marks=() if name == "small_cnn" else pytest.mark.slow) for name in SMALL])
def test_the_backbone_features_then_the_head_are_the_encoder(name):
    model, size = SMALL[name]
    variables = _random_variables(model, size)
    images = jax.random.uniform(jax.random.key(2), (3, size, size, 3))
    head = features_cache.FeatureHead(features_cache.head_fields_of(model, size))

    @jax.jit
    def both_ways(variables, images):
        features = features_cache.BackboneFeatures(model).apply(variables, images, train=False)
        return features, head.apply(variables, features, train=False), model.apply(
            variables, images, train=False)

    features, through_the_head, whole = both_ways(variables, images)
    assert features.ndim == 2 and features.shape[0] == 3
    np.testing.assert_allclose(through_the_head, whole, atol=1e-6)


def test_the_head_takes_the_encoders_own_settings():
    model, size = SMALL["inception_resnet_v1"]
    fields = features_cache.head_fields_of(model.clone(bn_axis_name="batch"), size)
    assert fields["embedding_dim"] == 8 and fields["use_bn"] and fields["bn_use_scale"]
    assert fields["bn_axis_name"] == "batch" and fields["bn_momentum"] == 0.995
    assert fields["bn_epsilon"] == 1e-3
    assert isinstance(model, InceptionResNetV1)


def test_features_of_each_image_and_its_mirror():
    model, size = SMALL["small_cnn"]
    variables = _random_variables(model, size)
    images = np.asarray(jax.random.randint(jax.random.key(3), (5, size, size, 3), 0, 256),
                        np.uint8)
    table = features_cache.image_and_mirror_features(model, variables, images,
                                                     parallel.make_mesh(), batch_size=8)
    backbone = features_cache.BackboneFeatures(model)
    for flip in (0, 1):
        shown = images[:, :, ::-1] if flip else images
        np.testing.assert_allclose(
            table[:, flip], backbone.apply(variables, shown / 255.0, train=False), atol=1e-6)


def test_stored_features_are_computed_once_per_backbone_and_image(tmp_path, monkeypatch):
    model, size = SMALL["small_cnn"]
    variables = _random_variables(model, size)
    images = np.asarray(jax.random.randint(jax.random.key(4), (6, size, size, 3), 0, 256),
                        np.uint8)
    mesh = parallel.make_mesh()
    computed = []
    direct = features_cache.image_and_mirror_features

    def counting(encoder, variables, images, mesh, *, batch_size):
        computed.append(len(images))
        return direct(encoder, variables, images, mesh, batch_size=batch_size)

    monkeypatch.setattr(features_cache, "image_and_mirror_features", counting)

    def stored(variables, images):
        return features_cache.stored_image_and_mirror_features(
            model, variables, images, mesh, batch_size=8, store=tmp_path)

    first = stored(variables, images[:4])
    np.testing.assert_array_equal(first, direct(model, variables, images[:4], mesh,
                                                batch_size=8))
    # Another run (another fold) from the same backbone: only its new images are computed.
    again = stored(variables, images[2:])
    assert computed == [4, 2]
    np.testing.assert_array_equal(again[:2], first[2:])
    np.testing.assert_allclose(again, direct(model, variables, images[2:], mesh, batch_size=8),
                               atol=1e-6)
    # A trained head shares its source's features; another backbone has its own.
    head_trained = jax.tree.map(lambda x: x, variables)
    head_trained["params"][HEAD_SCOPE]["embedding"]["kernel"] = (
        head_trained["params"][HEAD_SCOPE]["embedding"]["kernel"] + 1.0)
    stored(head_trained, images)
    assert computed == [4, 2]
    moved = jax.tree.map(lambda x: x, variables)
    moved["batch_stats"]["BatchNorm_0"]["mean"] = moved["batch_stats"]["BatchNorm_0"]["mean"] + 1
    other = stored(moved, images[:1])
    assert computed == [4, 2, 1]
    assert not np.allclose(other, first[:1])
    assert len(list(tmp_path.iterdir())) == 2 and len(list(tmp_path.glob("*/*.npy"))) == 7


# ----------------------------------------------------------------------------------------------
# Bad configs: refused in one line before anything is read or compiled.

@pytest.mark.parametrize("overrides, message", [
    ({}, "pass --config.model.init_from=DIR"),
    ({"model.init_from": "somewhere", "optimizer.backbone_lr_multiplier": 0.1},
     "pass --config.optimizer.backbone_lr_multiplier=0 (got 0.1)"),
    ({"model.init_from": "somewhere", "data.augment.crop_padding": 2},
     "pass --config.data.augment.crop_padding=0 (got 2)"),
    ({"model.init_from": "somewhere", "model.cached_features": False,
      "model.cached_features_dir": "store"}, "leave model.cached_features_dir unset"),
])
def test_a_cached_features_config_without_what_it_needs_is_refused(overrides, message):
    config = cfg.load_config(DEFAULT, {**TINY, **CACHED, **overrides})
    with pytest.raises(ValueError, match="model.cached_features") as error:
        validate_run_config(config, num_devices=8)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_default_trains_as_before():
    config = cfg.load_config(DEFAULT, TINY)
    assert config.model.cached_features is False
    assert not features_cache.enabled(config)


def test_the_sampler_takes_the_rows_labels_and_flips_of_the_image_sampler():
    config = cfg.load_config(DEFAULT, {**TINY, "data.augment.crop_padding": 0})
    dataset = data.load_dataset(config.data)
    sampler = data.make_sampler(dataset, config, num_shards=8)
    features = np.arange(len(dataset.labels) * 2 * 3, dtype=np.float32).reshape(-1, 2, 3)
    cached = features_cache.CachedFeatureSampler(sampler, features)
    rows, _, flips = sampler.plan(5)
    assert flips.any() and not flips.all()
    batch, labels = cached.batch(5)
    np.testing.assert_array_equal(batch, features[rows, flips.astype(int)])
    np.testing.assert_array_equal(labels, sampler.batch(5)[1])
    second, _ = cached.host_batch(5, 1, 2)
    np.testing.assert_array_equal(second, batch[len(batch) // 2:])
    with pytest.raises(ValueError, match="crop_padding must be 0"):
        features_cache.CachedFeatureSampler(
            data.make_sampler(dataset, cfg.load_config(DEFAULT, TINY), num_shards=8), features)


# ----------------------------------------------------------------------------------------------
# A training step on cached features against a step written out by hand.

def _source(workdir, config):
    """A run folder holding a step-0 encoder of `config` with every variable moved at random."""
    workdir.mkdir(parents=True)
    runfiles.write_config(workdir, config)
    model, (tx, _) = build_model(config, bn_axis_name=None), build_optimizer(config)
    state = create_train_state(config, model, tx)
    size = config.data.image_size
    variables = _random_variables(model, size)
    state = state.replace(params={**state.params, "encoder": variables["params"]},
                          batch_stats=variables["batch_stats"])
    manager = checkpoints.make_manager(workdir, max_to_keep=1)
    checkpoints.save(manager, 0, parallel.put_replicated(state, parallel.make_mesh(1)))
    return workdir


def _small_cnn_features(model, variables, images):
    """small_cnn's pooled features, rebuilt from its last BatchNorm's output (eval mode)."""
    last_bn = f"BatchNorm_{len(model.widths) - 1}"
    _, captured = model.apply(variables, images, train=False, capture_intermediates=True,
                              mutable=["intermediates"])
    normalised = captured["intermediates"][last_bn]["__call__"][0]
    return jnp.mean(jax.nn.relu(normalised), axis=(1, 2))


@pytest.mark.slow
def test_a_cached_features_step_is_the_head_trained_alone_on_eval_features(tmp_path):
    lr = 0.5
    settings = {**TINY, **CACHED, "model.small_cnn.widths": (8, 16, 16, 16),
                "optimizer.name": "sgd", "optimizer.momentum": 0.0,
                "optimizer.learning_rate": lr, "optimizer.warmup_steps": 0,
                "optimizer.grad_clip_norm": 0.0, "num_steps": 1, "checkpoint_every": 1}
    source = _source(tmp_path / "source", cfg.load_config(DEFAULT, settings))
    config = cfg.load_config(DEFAULT, {**settings, "model.init_from": str(source),
                                       "model.cached_features_dir": str(tmp_path / "store")})
    run = tmp_path / "run"
    train.train_and_evaluate(config, run)

    # The step's batch: the image sampler's rows and flips of step 0.
    splits = data.split_dataset(data.load_dataset(config.data), config.data)
    sampler = data.make_sampler(splits["train"], config, num_shards=8)
    rows, offsets, flips = sampler.plan(0)
    images = sampler.augment.apply(np.asarray(splits["train"].images[rows]), offsets, flips)
    labels = splits["train"].labels[rows]
    stored = list((tmp_path / "store").glob("*/*.npy"))
    assert len(stored) == len(splits["train"].labels)  # synthetic images are all distinct
    before, _ = finetune.read_variables(source)
    model = build_model(config, bn_axis_name=None)
    features = _small_cnn_features(model, before, images / 255.0)
    head = before["params"][HEAD_SCOPE]["embedding"]

    def embed(kernel, bias):
        z = features @ kernel + bias
        return z / jnp.linalg.norm(z, axis=1, keepdims=True)

    embeddings = np.asarray(embed(head["kernel"], head["bias"]), np.float64)
    dist = ((embeddings[:, None] - embeddings[None]) ** 2).sum(-1)
    loss = tfa_semihard_loss(dist, labels, margin=config.loss.margin)
    logged = next(row for row in read_metrics(run) if row["step"] == 1)
    assert logged["loss"] == pytest.approx(loss, rel=1e-5)

    def mean_loss(kernel, bias):
        return triplet_loss(embed(kernel, bias), jnp.asarray(labels), margin=config.loss.margin,
                            strategy="semihard", distance="squared")[0]

    grads = jax.jit(jax.grad(mean_loss, argnums=(0, 1)))(head["kernel"], head["bias"])
    after, step = finetune.read_variables(run)
    assert step == 1
    trained = after["params"][HEAD_SCOPE]["embedding"]
    np.testing.assert_allclose(trained["kernel"], head["kernel"] - lr * grads[0], atol=1e-6)
    np.testing.assert_allclose(trained["bias"], head["bias"] - lr * grads[1], atol=1e-6)
    # The step moved the head well beyond the comparison's tolerance.
    assert np.abs(trained["kernel"] - head["kernel"]).max() > 20e-6

    # The backbone, parameters and statistics, is the source's to the bit.
    for collection in ("params", "batch_stats"):
        for scope, subtree in before[collection].items():
            if scope == HEAD_SCOPE:
                continue
            for saved, kept in zip(jax.tree.leaves(subtree),
                                   jax.tree.leaves(after[collection][scope])):
                np.testing.assert_array_equal(saved, kept)


@pytest.mark.slow
def test_arcface_on_cached_features_trains_the_head_and_keeps_the_backbone(tmp_path):
    settings = {**TINY, **CACHED, "num_steps": 2}
    source = _source(tmp_path / "source", cfg.load_config(DEFAULT, settings))
    config = cfg.load_config(DEFAULT, {**settings, "model.init_from": str(source),
                                       "loss.kind": "classification",
                                       "loss.classification.head": "arcface"})
    run = tmp_path / "run"
    result = train.train_and_evaluate(config, run)
    assert np.isfinite(result["accuracy"])
    assert all(np.isfinite(row["loss"]) for row in read_metrics(run) if "loss" in row)
    before, _ = finetune.read_variables(source)
    after, step = finetune.read_variables(run)
    assert step == 2
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
    assert moved["params"].pop(HEAD_SCOPE) == {"embedding": {"kernel": True, "bias": True}}
    assert not any(jax.tree.leaves(moved["params"]))
    assert not any(jax.tree.leaves(moved["batch_stats"]))
