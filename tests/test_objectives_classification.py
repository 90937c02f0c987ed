"""The classification objectives in the train step: centres sharded over 8 devices equal one
device holding everything.

The reference is written without the objective or the step: plain `jax.grad` of
`losses.classification_loss` (the one-device loss, itself checked against float64 numpy in
test_classification_losses.py) on the model applied to the whole batch, with the unsharded
centres. SGD with learning rate 1 makes each update the negative gradient, so the encoder's
gradient, every centre's gradient (each on the device holding it) and the joint clipping are
all compared.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from facenet_jax import checkpoints
from facenet_jax import config as config_lib
from facenet_jax import losses, models, objectives, parallel, state as state_lib
from facenet_jax.objectives import classification as cls_objective
from facenet_jax.train import make_train_step
from facenet_jax.train.validate import validate_run_config

from tiny import tiny_config

NUM_DEVICES = 8
P_IDS, K = 8, 4
NUM_CLASSES = 13  # not a multiple of 8: the last shards hold padding
SIZE, DIM = 16, 16
RTOL, ATOL = 2e-4, 2e-6
# (head, Partial FC sample fraction, clip norm): every head, Partial FC, and a clip that fires
# (the unclipped norm is ~0.5 here). Each case compiles its own 8-device step: the fast tier
# keeps the margin head with Partial FC and the clipped one, the others are slow.
HEAD_CASES = [("softmax", 1.0, None), ("normface", 1.0, None), ("cosface", 1.0, None),
              ("arcface", 1.0, None), ("arcface", 0.5, None), ("softmax", 0.5, 0.05)]
FAST_HEAD_CASES = {("softmax", 0.5, 0.05)}  # Partial FC and the joint clip


def _model(bn_axis_name):
    return models.create_model("small_cnn", embedding_dim=DIM, bn_axis_name=bn_axis_name)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (P_IDS * K, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.repeat(rng.choice(NUM_CLASSES, P_IDS, replace=False), K).astype(np.int32)
    return images, labels


def _objective(head, fraction, num_shards):
    # A small scale keeps the softmax far from saturation, so gradients are not all ~0.
    scale = None if head == "softmax" else 8.0
    return cls_objective.ClassificationObjective(
        head=head, num_classes=NUM_CLASSES, num_shards=num_shards, scale=scale,
        sample_fraction=fraction)


def _host_state(objective, tx):
    variables = jax.jit(lambda key: _model(None).init(key, jnp.zeros((2, SIZE, SIZE, 3)),
                                                      train=False))(jax.random.PRNGKey(0))
    head = objective.init(jax.random.PRNGKey(3), DIM)
    # Spread the centres so the logits differ clearly between classes.
    head["centres"] = head["centres"] * 100.0
    params = {"encoder": variables["params"], "head": head}
    return jax.device_get(state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        opt_state=tx.init(params), extra={}, rng=jax.random.PRNGKey(7)))


def _reference(state, images, labels, objective, clip_norm):
    """One device, whole batch, every class, no collectives: (loss, encoder grads, head grads,
    grad norm before clipping)."""
    model = _model(None)
    key = jax.random.fold_in(state.rng, state.step)
    mask = None
    if objective.sample_fraction < 1:
        mask = losses.partial_fc_mask(jax.random.fold_in(key, cls_objective._PARTIAL_FC_STREAM),
                                      jnp.asarray(labels), NUM_CLASSES,
                                      objective.sample_fraction)

    def loss_fn(params):
        emb, _ = model.apply({"params": params["encoder"], "batch_stats": state.batch_stats},
                             jnp.asarray(images, jnp.float32) / 255.0, train=True,
                             mutable=["batch_stats"])
        head = params["head"]
        bias = head["bias"][:NUM_CLASSES] if "bias" in head else None
        return losses.classification_loss(
            emb, head["centres"][:NUM_CLASSES], bias, jnp.asarray(labels),
            head=objective.head, scale=objective.scale, margin=objective.margin,
            class_mask=mask)[0]

    # Jitted: op by op, the reference alone compiled ~400 programs.
    value, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    norm = optax.global_norm(grads)
    if clip_norm is not None and norm > clip_norm:
        grads = jax.tree.map(lambda g: g / norm * clip_norm, grads)
    return value, grads, norm


def _assert_tree_close(actual, expected, what):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("head,fraction,clip_norm", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-clip{case[2]}",
                 marks=() if case in FAST_HEAD_CASES else pytest.mark.slow)
    for case in HEAD_CASES])
def test_sharded_centres_match_one_device(head, fraction, clip_norm):
    """Also the joint clipping: one optax chain's clip_by_global_norm over the encoder and the
    centres split over 8 devices clips as the one-device reference does."""
    tx = optax.sgd(1.0)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    objective = _objective(head, fraction, NUM_DEVICES)
    state = _host_state(objective, tx)
    images, labels = _batch()
    ref_loss, ref_grads, ref_norm = _reference(state, images, labels, objective, clip_norm)

    mesh = parallel.make_mesh(NUM_DEVICES)
    specs = state_lib.partition_specs(state, objective, tx)
    step = make_train_step(mesh, state_specs=specs, model=_model(None), tx=tx,
                           schedule=optax.constant_schedule(1.0), objective=objective)
    new_state, metrics = step(parallel.put_with_specs(state, specs, mesh), images, labels)

    assert float(ref_loss) > 0.05, "the case must exercise a non-zero gradient"
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["grad_norm"], ref_norm, rtol=RTOL)
    if clip_norm is not None:
        assert ref_norm > clip_norm, "the clip must fire"
    encoder_update = jax.tree.map(lambda new, old: old - new, new_state.params["encoder"],
                                  state.params["encoder"])
    _assert_tree_close(encoder_update, ref_grads["encoder"], "encoder gradient")
    centres = new_state.params["head"]["centres"]  # still split along the classes
    assert centres.sharding.shard_shape(centres.shape) == (centres.shape[0] // NUM_DEVICES, DIM)
    head_update = jax.tree.map(lambda new, old: old - np.asarray(new),
                               new_state.params["head"], state.params["head"])
    for name, update in head_update.items():
        _assert_tree_close(update[:NUM_CLASSES], ref_grads["head"][name][:NUM_CLASSES],
                           f"{name} gradient")
        np.testing.assert_array_equal(update[NUM_CLASSES:], 0.0)  # padding never moves
    if fraction < 1:  # Partial FC: the classes left out of the softmax get no gradient
        untouched = np.all(head_update["centres"][:NUM_CLASSES] == 0.0, axis=1)
        assert untouched.any() and not untouched.all()


def test_optimizer_state_of_the_centres_is_laid_out_as_the_centres():
    """state.partition_specs: the momentum of the centres is split along the classes as the
    centres are, the encoder's replicated, also through backbone_lr_multiplier's
    multi_transform (whose label function optax.tree_map_params cannot call)."""
    from facenet_jax import optim

    config = _config(**{"optimizer.backbone_lr_multiplier": 0.5, "optimizer.momentum": 0.9})
    tx = optim.make_optimizer(config.optimizer, config.num_steps)
    objective = _objective("arcface", 1.0, NUM_DEVICES)
    specs = state_lib.partition_specs(_host_state(objective, tx), objective, tx)
    assert specs.params["head"] == {"centres": P(parallel.AXIS)}
    momentum = [(jax.tree_util.keystr(path), spec) for path, spec in
                jax.tree_util.tree_leaves_with_path(specs.opt_state,
                                                    is_leaf=lambda x: isinstance(x, P))]
    centres = [spec for path, spec in momentum if path.endswith("['head']['centres']")]
    assert centres and all(spec[0] == parallel.AXIS for spec in centres)
    assert all(not any(spec) for path, spec in momentum if "['encoder']" in path)


def _config(**overrides):
    config = config_lib.load_config("experiments/default.py")
    config.optimizer.name = "sgd"
    for key, value in overrides.items():
        config_lib.set_dotted(config, key, value)
    return config


@pytest.mark.slow
def test_combined_logs_both_terms_and_adds_the_weighted_triplet_loss():
    objective = objectives.CombinedObjective(
        _objective("cosface", 1.0, NUM_DEVICES),
        objectives.TripletObjective(objectives.LossSpec("semihard", 0.2, "squared", False)),
        triplet_weight=0.5)
    tx = optax.sgd(0.0)
    state = _host_state(objective, tx)
    images, labels = _batch(1)
    mesh = parallel.make_mesh(NUM_DEVICES)
    specs = state_lib.partition_specs(state, objective, tx)
    step = make_train_step(mesh, state_specs=specs, model=_model(None), tx=tx,
                           schedule=optax.constant_schedule(0.0), objective=objective)
    _, metrics = step(parallel.put_with_specs(state, specs, mesh), images, labels)
    @jax.jit
    def reference(variables, centres, images, labels):
        emb, _ = _model(None).apply(variables, images.astype(jnp.float32) / 255.0, train=True,
                                    mutable=["batch_stats"])
        classification, _ = losses.classification_loss(emb, centres[:NUM_CLASSES], None, labels,
                                                        head="cosface", scale=8.0)
        triplet, _ = losses.triplet_loss(emb, labels, margin=0.2, strategy="semihard")
        return classification, triplet

    classification, triplet = reference(state.variables, state.params["head"]["centres"],
                                        images, labels)
    np.testing.assert_allclose(metrics["classification_loss"], classification, rtol=RTOL)
    np.testing.assert_allclose(metrics["triplet_loss"], triplet, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], classification + 0.5 * triplet, rtol=RTOL)
    assert set(objective.stats_keys) <= set(metrics)


def test_triplet_is_the_default_and_classification_keys_do_not_change_triplet_runs():
    config = _config()
    assert config.loss.kind == "triplet"
    assert type(objectives.from_config(config)) is objectives.TripletObjective
    plain = config_lib.to_plain(config)
    # With kind "triplet", the head settings change nothing: not a changed run.
    other_head = config_lib.to_plain(_config(**{"loss.classification.head": "cosface"}))
    assert config_lib.changed_keys(plain, other_head) == []
    arcface = config_lib.to_plain(_config(**{"loss.kind": "classification"}))
    assert "loss.kind" in config_lib.changed_keys(plain, arcface)


@pytest.mark.parametrize("override,message", [
    ({"loss.kind": "softmax"}, "unknown loss.kind"),
    ({"loss.kind": "classification", "loss.classification.head": "sphereface"}, "head"),
    ({"loss.kind": "classification", "loss.classification.margin": -0.1}, "margin"),
    ({"loss.kind": "classification", "loss.classification.sample_fraction": 0.0},
     "sample_fraction"),
    ({"loss.kind": "combined", "loss.triplet_weight": -1.0}, "triplet_weight"),
    ({"loss.kind": "classification", "loss.memory.size": 128}, "memory"),
    ({"loss.kind": "classification", "loss.warmup_steps": 10,
      "loss.warmup_strategy": "semihard"}, "warmup_steps"),
])
def test_bad_objective_configs_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        validate_run_config(_config(**override), num_devices=1)


def test_each_kind_is_a_registry_entry_that_knows_what_it_reads():
    assert objectives.LOSS_KINDS == ("triplet", "classification", "combined")
    triplet, classification, combined = map(objectives.OBJECTIVES.get, objectives.LOSS_KINDS)
    assert [k.has_parameters for k in (triplet, classification, combined)] == [
        False, True, True]
    reads = {key: [k.reads(key) for k in (triplet, classification, combined)] for key in (
        "loss.kind", "loss.margin", "loss.memory.size", "loss.classification.head",
        "loss.triplet_weight", "model.name")}
    assert reads == {"loss.kind": [True, True, True], "loss.margin": [True, False, True],
                     "loss.memory.size": [True, False, False],
                     "loss.classification.head": [False, True, True],
                     "loss.triplet_weight": [False, False, True],
                     "model.name": [True, True, True]}
    # A key the run's kind does not read changes nothing, whichever the kind.
    arcface = config_lib.to_plain(_config(**{"loss.kind": "classification"}))
    other_alpha = config_lib.to_plain(_config(**{"loss.kind": "classification",
                                                 "loss.margin": 0.5}))
    assert config_lib.changed_keys(arcface, other_alpha) == []


def test_unknown_kind_names_the_valid_ones():
    config = _config(**{"loss.kind": "softmax"})
    message = "unknown loss.kind 'softmax'; valid kinds: triplet, classification, combined"
    for check in (lambda: objectives.validate_objective_config(config.loss),
                  lambda: objectives.from_config(config, num_classes=3),
                  lambda: objectives.has_parameters(config)):
        with pytest.raises(ValueError, match=message):
            check()


def test_combined_refuses_the_memory_and_classification_the_warmup():
    with pytest.raises(ValueError, match="memory is an option of loss.kind 'triplet'; with "
                                         "loss.kind='combined' set it to 0"):
        objectives.validate_objective_config(
            _config(**{"loss.kind": "combined", "loss.memory.size": 64}).loss)
    with pytest.raises(ValueError, match="loss.kind='classification' mines no triplets"):
        objectives.validate_objective_config(_config(**{
            "loss.kind": "classification", "loss.warmup_steps": 10,
            "loss.warmup_strategy": "semihard"}).loss)
    objectives.validate_objective_config(_config(**{  # combined mines: its warm-up is fine
        "loss.kind": "combined", "loss.warmup_steps": 10, "loss.warmup_strategy": "semihard"}).loss)
    with pytest.raises(ValueError, match="needs the number of training classes"):
        objectives.from_config(_config(**{"loss.kind": "combined"}))


def _tiny_run_config(**overrides):
    return tiny_config({
        "optimizer.name": "sgd", "loss.kind": "classification",
        "loss.classification.head": "arcface", "loss.classification.sample_fraction": 0.5,
        "optimizer.warmup_steps": 0, "data.synthetic.num_identities": 45, "log_every": 1,
        "eval_every": 100, "checkpoint_every": 2, "model.embedding_dim": DIM, **overrides})


@pytest.mark.slow
def test_sharded_centres_checkpoint_and_resume_exactly(tmp_path, eight_devices):
    """A run stopped at step 2 and resumed to 4 ends bit for bit where an uninterrupted run
    does: the centres (split over the 8 devices), their optimizer state, the encoder."""
    from facenet_jax.train import train_and_evaluate

    train_and_evaluate(_tiny_run_config(num_steps=4), tmp_path / "straight")
    train_and_evaluate(_tiny_run_config(num_steps=2), tmp_path / "resumed")
    train_and_evaluate(_tiny_run_config(num_steps=4), tmp_path / "resumed")
    straight = checkpoints.read_arrays(tmp_path / "straight", 4)
    resumed = checkpoints.read_arrays(tmp_path / "resumed", 4)
    assert straight.keys() == resumed.keys()
    assert "params/head/centres" in straight
    assert any(k.startswith("opt_state/") and k.endswith("head/centres") for k in straight)
    # 45 identities → 36 training classes, 8 devices → centres padded to 40 rows.
    assert straight["params/head/centres"].shape == (40, DIM)
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    assert json.loads((tmp_path / "resumed" / "eval.json").read_text())["step"] == 4
