"""Encoder fields from the config: the pre-filled blocks `config.model.<name>.<field>`, their
validation, what reaches the module."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax import config as cfg
from facenet_jax import models, train
from facenet_jax.eval.embed import load_encoder
from facenet_jax.logs import read_metrics
from facenet_jax.state import build_model
from facenet_jax.train.validate import validate_run_config

from tiny import tiny_config

DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
TINY = {"num_steps": 2, "checkpoint_every": 2, "eval_every": 100,  # on top of runlocal
        "data.synthetic.images_per_identity": 3, "data.pairs.pairs_per_fold": 5}


def _param_shapes(model, size=32):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((2, size, size, 3)), train=False))
    return {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(variables["params"])}


def test_default_config_holds_every_encoders_block_at_the_module_defaults():
    model = cfg.load_config(DEFAULT).model
    for name in models.ENCODERS.names():
        assert model[name].to_dict() == models.default_fields(name), name
        assert not set(model[name]) & set(models.COMMON_FIELDS)


def test_a_block_override_reaches_the_module():
    config = cfg.load_config(DEFAULT, {"model.small_cnn.widths": (8, 8, 24),
                                       "model.small_cnn.convs_per_stage": 2,
                                       "model.small_cnn.dropout_rate": 0.25})
    validate_run_config(config, num_devices=1)
    model = build_model(config, bn_axis_name=None)
    assert (model.widths, model.convs_per_stage, model.dropout_rate) == ((8, 8, 24), 2, 0.25)
    shapes = _param_shapes(model)
    convs = sorted(k for k in shapes if "Conv" in k)
    assert len(convs) == 6  # 3 stages × 2 convs
    assert [shapes[k][-1] for k in convs] == [8, 8, 8, 8, 24, 24]
    # The default block builds exactly today's module.
    default = build_model(cfg.load_config(DEFAULT), bn_axis_name=None)
    assert default == models.create_model("small_cnn", embedding_dim=128)


def test_only_the_block_of_model_name_is_used():
    config = cfg.load_config(DEFAULT, {"model.name": "resnet18",
                                       "model.resnet18.stage_sizes": (1, 1),
                                       "model.small_cnn.widths": (4,)})
    model = build_model(config, bn_axis_name=None)
    assert model.stage_sizes == (1, 1) and model.model_name == "resnet18"
    assert model.block is models.BasicBlock
    plain = cfg.to_plain(config)
    unused = cfg.to_plain(cfg.load_config(DEFAULT, {"model.name": "resnet18",
                                                    "model.resnet18.stage_sizes": (1, 1)}))
    assert cfg.changed_keys(plain, unused) == []  # small_cnn's block changes nothing here
    assert cfg.changed_keys(plain, cfg.to_plain(cfg.load_config(DEFAULT, {
        "model.name": "resnet18"}))) == ["model.resnet18.stage_sizes"]


@pytest.mark.parametrize("block, message", [
    ({"width": (8,)}, r"unknown field\(s\) \['width'\] in config.model.small_cnn; valid fields: "
                      r"widths, convs_per_stage, first_stride, bn_momentum, dropout_rate"),
    ({"widths": ("a", 8)}, r"config.model.small_cnn.widths must be a non-empty tuple of integers"),
    ({"widths": ()}, "non-empty tuple"),
    ({"widths": 16}, "non-empty tuple"),
    ({"convs_per_stage": 0}, r"convs_per_stage must be an integer >= 1"),
    ({"convs_per_stage": True}, "an integer >= 1"),
    ({"first_stride": 1.5}, "an integer >= 1"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be a finite number in \[0.0, 1.0\)"),
    ({"dropout_rate": "0.5"}, "dropout_rate must be a finite number"),
    ({"bn_momentum": float("nan")}, "bn_momentum must be a finite number"),
])
def test_bad_block_values_name_the_field(block, message):
    with pytest.raises(ValueError, match=message):
        models.config_kwargs({"name": "small_cnn", "small_cnn": block})


def test_other_bad_blocks_and_what_is_allowed():
    with pytest.raises(ValueError, match="head_bn must be True or False"):
        models.config_kwargs({"name": "resnet34", "resnet34": {"head_bn": 1}})
    with pytest.raises(ValueError, match="config.model.smallcnn is the block of no encoder"):
        models.config_kwargs({"name": "small_cnn", "smallcnn": {"widths": (8,)}})
    with pytest.raises(ValueError, match="unknown model.name 'vgg'; valid names: small_cnn"):
        models.config_kwargs({"name": "vgg"})
    # Lists (a JSON record) become tuples; ints are accepted for floats; a block may be partial
    # or absent (its fields read as their defaults); inception may drop a stage's blocks.
    assert models.config_kwargs({"name": "small_cnn", "small_cnn": {"widths": [8, 16],
                                                                    "dropout_rate": 0}}) == {
        **models.default_fields("small_cnn"), "widths": (8, 16), "dropout_rate": 0.0}
    assert models.config_kwargs({"name": "resnet50"}) == models.default_fields("resnet50")
    inception = models.config_kwargs({"name": "inception_resnet_v1", "bn_scale": True,
                                      "inception_resnet_v1": {"block17_repeats": 0}})
    assert inception["block17_repeats"] == 0 and inception["bn_scale"] is True
    # Through the config file and the command line: ml_collections' own checks come first.
    with pytest.raises(KeyError, match="model.small_cnn.width"):
        cfg.load_config(DEFAULT, {"model.small_cnn.width": (8,)})
    config = cfg.load_config(DEFAULT)
    config.model.small_cnn.widths = ("a",)
    with pytest.raises(ValueError, match="config.model.small_cnn.widths"):
        validate_run_config(config, num_devices=1)


def test_bn_scale_is_the_top_level_key_only():
    """One setting, one key: inception's bn_scale is `config.model.bn_scale` (older than the
    blocks; imported FaceNet weights set it), not a block field, so the two cannot disagree."""
    assert "bn_scale" not in cfg.load_config(DEFAULT).model.inception_resnet_v1
    with pytest.raises(KeyError, match="inception_resnet_v1.bn_scale"):
        cfg.load_config(DEFAULT, {"model.inception_resnet_v1.bn_scale": True})
    for bn_scale in (False, True):
        config = cfg.load_config(DEFAULT, {"model.name": "inception_resnet_v1",
                                           "model.bn_scale": bn_scale})
        assert build_model(config, bn_axis_name=None).bn_scale is bn_scale
    with pytest.raises(ValueError, match="inception_resnet_v1 only"):
        validate_run_config(cfg.load_config(DEFAULT, {"model.bn_scale": True}), num_devices=1)


@pytest.mark.slow
def test_dropout_trains_and_eval_is_deterministic(tmp_path):
    """dropout_rate > 0 trains (the step draws the masks), embedding is deterministic (no
    dropout at eval)."""
    dropout = tiny_config({**TINY, "model.small_cnn.dropout_rate": 0.5})
    run = tmp_path / "dropout"
    train.train_and_evaluate(dropout, run)
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    encoder = load_encoder(run)
    assert encoder.config.model.small_cnn.dropout_rate == 0.5
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    first, second = encoder.embed(images), encoder.embed(images)
    np.testing.assert_array_equal(first, second)
    model = build_model(encoder.config, bn_axis_name=None)
    direct = model.apply(encoder.variables, jnp.asarray(images, jnp.float32) / 255.0,
                         train=False)  # no dropout rng needed: dropout is off
    np.testing.assert_allclose(first, direct, atol=1e-5)
