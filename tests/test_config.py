"""Configs, validation before compile, optimiser schedules, JSON safety of logs."""

import json
import math

import numpy as np
import pytest

from facenet_jax import config as cfg
from facenet_jax import optim, runfiles
from facenet_jax.logs import MetricsWriter, read_metrics, truncate_metrics
from facenet_jax.train.validate import validate_run_config

DEFAULT = cfg.pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"


def test_load_config_applies_dotted_overrides():
    config = cfg.load_config(DEFAULT, {"loss.margin": 0.3, "batch.identities": 16})
    assert config.loss.margin == 0.3 and config.batch.identities == 16
    assert config.data.root is None  # placeholder still accepts a later override
    config.data.root = "/somewhere"


def test_unknown_key_and_wrong_type_are_errors():
    with pytest.raises(KeyError, match="loss.margn"):
        cfg.load_config(DEFAULT, {"loss.margn": 0.3})
    with pytest.raises(KeyError, match="los"):
        cfg.load_config(DEFAULT, {"los.margin": 0.3})
    with pytest.raises(TypeError):
        cfg.load_config(DEFAULT, {"batch.identities": "many"})


@pytest.mark.parametrize("override, message", [
    ({"loss.strategy": "semi-hard"}, "semihard"),
    ({"loss.distance": "manhattan"}, "squared"),
    ({"loss.margin": -0.1}, "margin"),
    ({"model.name": "vgg"}, "small_cnn"),
    ({"data.source": "webdataset"}, "unknown data.source 'webdataset'; valid sources"),
    ({"data.prefetch": 0}, "config.data.prefetch must be a positive integer"),
    ({"model.dtype": "float16"}, r"model.dtype must be one of \('float32', 'bfloat16'\)"),
    ({"optimizer.name": "lamb"}, "adagrad"),
    ({"parallel.mining": "world"}, "global"),
    ({"batch.images_per_identity": 1}, "K"),
    ({"batch.identities": 1}, "identities"),
    ({"batch.identities": 12}, "divisible"),
    ({"num_steps": 0}, "num_steps"),
    ({"model.input_norm": "imagenet"}, "model.input_norm must be one of"),
    ({"model.bn_scale": True}, "inception_resnet_v1 only"),
    ({"optimizer.backbone_lr_multiplier": -0.5}, "backbone_lr_multiplier must be >= 0"),
    ({"optimizer.backbone_lr_multiplier": float("nan")}, "backbone_lr_multiplier must be >= 0"),
    ({"optimizer.backbone_lr_multiplier": float("inf")}, "backbone_lr_multiplier must be >= 0"),
])
def test_validate_config_names_the_problem(override, message):
    config = cfg.load_config(DEFAULT, override)
    with pytest.raises(ValueError, match=message):
        validate_run_config(config, num_devices=8)


def test_default_config_is_valid_on_1_and_8_devices():
    for devices in (1, 8):
        validate_run_config(cfg.load_config(DEFAULT), num_devices=devices)


def test_changed_keys_ignores_resumable_ones():
    a = cfg.to_plain(cfg.load_config(DEFAULT))
    b = cfg.to_plain(cfg.load_config(DEFAULT, {"num_steps": 5000, "log_every": 1,
                                               "model.embedding_dim": 64}))
    assert cfg.changed_keys(a, b) == ["model.embedding_dim"]


def test_changed_keys_reports_a_key_only_one_config_holds():
    """No key is read as a default: a record without a key differs from a config with it."""
    recorded = cfg.to_plain(cfg.load_config(DEFAULT))
    del recorded["loss"]["soft"]
    current = cfg.to_plain(cfg.load_config(DEFAULT))
    assert cfg.changed_keys(recorded, current) == ["loss.soft"]
    assert cfg.changed_keys(current, recorded) == ["loss.soft"]
    recorded["loss"]["soft"] = None  # held as None on one side, absent on the other: differs
    del current["loss"]["soft"]
    assert cfg.changed_keys(recorded, current) == ["loss.soft"]


def test_changed_keys_reads_configs_that_change_nothing_as_one():
    """The equivalence rules: an unset data.pairs.seed is `seed`; the blocks of encoders
    other than model.name, and the classification keys of a triplet run, change nothing."""
    base = cfg.to_plain(cfg.load_config(DEFAULT))
    same = [{"data.pairs.seed": 0}, {"model.resnet18.bn_momentum": 0.5},
            {"loss.classification.scale": 30.0, "loss.triplet_weight": 0.5}]
    for overrides in same:
        assert cfg.changed_keys(base, cfg.to_plain(cfg.load_config(DEFAULT, overrides)),
                                allowed=()) == [], overrides
    differ = {"data.pairs.seed": ({"data.pairs.seed": 1}, {}),
              "model.small_cnn.bn_momentum": ({"model.small_cnn.bn_momentum": 0.5}, {}),
              "model.resnet18.bn_momentum": ({"model.resnet18.bn_momentum": 0.5},
                                             {"model.name": "resnet18"}),
              "loss.classification.scale": ({"loss.classification.scale": 30.0},
                                            {"loss.kind": "classification"})}
    for key, (changed, common) in differ.items():
        a = cfg.to_plain(cfg.load_config(DEFAULT, common))
        b = cfg.to_plain(cfg.load_config(DEFAULT, {**common, **changed}))
        assert cfg.changed_keys(a, b, allowed=()) == [key]
def test_json_safe_maps_non_finite_to_null():
    value = cfg.json_safe({"a": float("nan"), "b": np.float32(np.inf), "c": [1.5, np.int64(2)]})
    assert json.loads(json.dumps(value)) == {"a": None, "b": None, "c": [1.5, 2]}


def _opt(**kw):
    base = cfg.load_config(DEFAULT).optimizer
    base.update(kw)
    return base


def test_warmup_then_cosine_schedule():
    schedule = optim.make_schedule(_opt(learning_rate=1.0, warmup_steps=10, schedule="cosine"),
                                   110)
    assert float(schedule(0)) == 0.0
    assert math.isclose(float(schedule(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(schedule(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(schedule(60)), 0.5, rel_tol=1e-5)  # half-way down the cosine
    assert float(schedule(110)) < 1e-6


def test_piecewise_schedule_decays_at_fractions():
    schedule = optim.make_schedule(
        _opt(learning_rate=1.0, warmup_steps=0, schedule="piecewise",
             decay_boundaries=(0.5, 0.75), decay_factor=0.1), 100)
    assert [round(float(schedule(s)), 6) for s in (49, 51, 76)] == [1.0, 0.1, 0.01]


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match="learning_rate"):
        optim.validate_optimizer_config(_opt(learning_rate=0.0), 10)
    with pytest.raises(ValueError, match="decay_boundaries"):
        optim.validate_optimizer_config(_opt(schedule="piecewise", decay_boundaries=(1.5,)), 10)


def test_metrics_log_nulls_and_truncation(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float("nan") if step == 2 else 0.5})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a torn line from a killed process
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] is None
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert any((tmp_path / "tensorboard").iterdir())


def test_init_from_must_be_a_run_folder_with_a_checkpoint(tmp_path):
    from facenet_jax import finetune

    with pytest.raises(ValueError, match="model.init_from=.*no config.json"):
        finetune.check_init_dir(tmp_path / "nothing")
    (tmp_path / "config.json").write_text("{}")  # no layout version recorded
    with pytest.raises(ValueError, match="layout version none"):
        finetune.check_init_dir(tmp_path)
    runfiles.write_config(tmp_path, cfg.load_config(DEFAULT))
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        finetune.check_init_dir(tmp_path)


def test_backbone_lr_multiplier_scales_the_backbone_updates_only():
    """The train params {"encoder", "head"}: the encoder's backbone is scaled; its embedding
    head and the objective's own parameters (class centres) train at the base rate."""
    import jax.numpy as jnp

    params = {"encoder": {"ConvBN_0": {"kernel": jnp.ones(3)},
                          optim.HEAD_SCOPE: {"kernel": jnp.ones(2)}},
              "head": {"centres": jnp.ones((4, 2))}}
    grads = {"encoder": {"ConvBN_0": {"kernel": jnp.full(3, 2.0)},
                         optim.HEAD_SCOPE: {"kernel": jnp.full(2, 2.0)}},
             "head": {"centres": jnp.full((4, 2), 2.0)}}
    updates = {}
    for multiplier in (1.0, 0.25, 0.0):
        tx = optim.make_optimizer(_opt(name="sgd", momentum=0.0, schedule="constant",
                                       warmup_steps=0, learning_rate=0.1, grad_clip_norm=None,
                                       backbone_lr_multiplier=multiplier), 10)
        updates[multiplier], _ = tx.update(grads, tx.init(params), params)
    for multiplier in (1.0, 0.25, 0.0):  # plain SGD: update = -lr * multiplier * grad
        encoder = updates[multiplier]["encoder"]
        np.testing.assert_allclose(encoder["ConvBN_0"]["kernel"], -0.2 * multiplier)
        np.testing.assert_allclose(encoder[optim.HEAD_SCOPE]["kernel"], -0.2)
        np.testing.assert_allclose(updates[multiplier]["head"]["centres"], -0.2)


def test_a_resumed_fine_tune_never_reads_init_from(tmp_path):
    from facenet_jax import finetune
    from facenet_jax.state import build_model, build_optimizer

    config = cfg.load_config(DEFAULT, {"model.init_from": str(tmp_path / "gone")})
    model, (tx, _) = build_model(config, bn_axis_name=None), build_optimizer(config)
    state = finetune.initial_state(config, model, tx, resuming=True)  # the restore target
    assert int(state.step) == 0
    with pytest.raises(ValueError, match="no config.json"):
        finetune.initial_state(config, model, tx, resuming=False)
