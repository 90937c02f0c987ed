"""The train step over global arrays: global mining on 8 devices equals one device on the whole
batch.

The reference is written independently of `train_step`: plain `jax.grad` of `triplet_loss` on the
model applied to the whole batch (BatchNorm with no axis = global-batch statistics), no
collectives. SGD with learning rate 1 makes the parameter update the negative gradient, so a
gradient that is n× too large (the classic double-psum bug) cannot pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from facenet_jax import losses, models, parallel
from facenet_jax.state import TrainState
from facenet_jax.train import LossSpec, make_train_step

NUM_DEVICES = 8
P_IDS, K = 8, 4  # one identity of 4 images per device
SIZE = 16
RTOL, ATOL = 2e-4, 2e-6


def _model(bn_axis_name):
    return models.create_model("small_cnn", embedding_dim=16, bn_axis_name=bn_axis_name)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (P_IDS * K, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(P_IDS), K).astype(np.int32)
    return images, labels


def _state(tx):
    """A host (numpy) state, so donating its device copy cannot delete the reference."""
    variables = jax.jit(lambda key: _model(None).init(key, jnp.zeros((2, SIZE, SIZE, 3)),
                                                      train=False))(jax.random.PRNGKey(0))
    params = {"encoder": variables["params"], "head": {}}
    return jax.device_get(TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        opt_state=tx.init(params), extra={}, rng=jax.random.PRNGKey(7)))


def _reference_grads(state, images, labels, loss: LossSpec):
    """One device, whole batch, no collectives."""
    model = _model(None)
    key = jax.random.fold_in(state.rng, state.step)

    def objective(params):
        emb, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   jnp.asarray(images, jnp.float32) / 255.0, train=True,
                                   mutable=["batch_stats"])
        value, stats = losses.triplet_loss(
            emb, jnp.asarray(labels), margin=loss.margin, strategy=loss.strategy,
            distance=loss.distance, soft=loss.soft, key=key, **dict(loss.options))
        return value, (stats, updates["batch_stats"])

    (value, (stats, batch_stats)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
        state.params["encoder"])  # jitted: op by op compiles hundreds of programs
    return value, stats, grads, batch_stats


def _sharded_step(loss, mining, tx, num_devices=NUM_DEVICES, model=None):
    mesh = parallel.make_mesh(num_devices)
    step = make_train_step(mesh, model=model or _model(None), tx=tx,
                           schedule=optax.constant_schedule(1.0), loss=loss, mining=mining)
    return mesh, step


def _assert_tree_close(actual, expected, what):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                            jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


# Every strategy, plus semi-hard with the max_positives hint (each device's anchors mined
# against the gathered batch with the cap at K - 1).
GLOBAL_CASES = [(strategy, ()) for strategy in losses.STRATEGIES] + [
    ("semihard", (("max_positives", K - 1),))]


@pytest.mark.parametrize("strategy,options", [  # the fast tier: semi-hard and hardest
    pytest.param(s, o, id=f"{s}{'-' + str(dict(o)) if o else ''}",
                 marks=() if (s, o) in (("semihard", ()), ("hardest", ())) else pytest.mark.slow)
    for s, o in GLOBAL_CASES])
def test_global_mining_matches_one_device(strategy, options):
    _assert_global_step_matches_one_device(strategy, options)


@pytest.mark.parametrize("strategy", ["semihard", "distance_weighted"])
def test_global_mining_in_anchor_blocks_matches_one_device(strategy, monkeypatch):
    """With the default blocks lowered to 64 entries, each device mines its 4 anchors against
    the 32 gathered candidates in 2 blocks (the per-block gradient of
    `triplet._sums_by_blocks`, a custom_vjp, inside shard_map with a traced anchor_start):
    the same step as one device on the whole batch in one block."""
    from facenet_jax.losses import triplet

    def lower_the_blocks():
        monkeypatch.setattr(triplet, "AUTO_CHUNK_ELEMENTS", 64)
        assert triplet.auto_anchor_chunk(P_IDS * K // NUM_DEVICES, P_IDS * K) == 2

    _assert_global_step_matches_one_device(strategy, (), before_step=lower_the_blocks)


def _assert_global_step_matches_one_device(strategy, options, before_step=lambda: None):
    """The 8-device global-mining step against `_reference_grads`; before_step runs between
    the reference and the step."""
    tx = optax.sgd(1.0)
    loss = LossSpec(strategy=strategy, margin=0.5, distance="squared", soft=False,
                    options=options)
    images, labels = _batch()
    state = _state(tx)
    ref_loss, ref_stats, ref_grads, ref_bn = _reference_grads(state, images, labels, loss)

    before_step()
    mesh, step = _sharded_step(loss, "global", tx)
    new_state, metrics = step(parallel.put_replicated(state, mesh), images, labels)

    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=RTOL, atol=ATOL)
    assert float(ref_loss) > 0, "the case must exercise a non-zero gradient"
    for key in ("num_triplets", "num_active", "mean_d_ap", "mean_d_an", "embedding_spread"):
        np.testing.assert_allclose(metrics[key], ref_stats[key], rtol=RTOL, atol=ATOL,
                                   err_msg=key)
    update = jax.tree.map(lambda new, old: old - new, new_state.params["encoder"],
                          state.params["encoder"])
    _assert_tree_close(update, ref_grads, "gradient")
    _assert_tree_close(new_state.batch_stats, ref_bn, "batch_stats")
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(ref_grads), rtol=RTOL)


def test_local_mining_mines_within_each_shard():
    tx = optax.sgd(1.0)
    loss = LossSpec(strategy="hardest", margin=0.5, distance="squared", soft=False)
    # Two identities per device so every shard has negatives of its own.
    images, _ = _batch(1)
    labels = np.repeat(np.arange(2 * NUM_DEVICES), 2).astype(np.int32)
    state = _state(tx)
    b = len(images) // NUM_DEVICES

    @jax.jit
    def per_shard_and_global_losses(variables, images, labels):
        emb, _ = _model(None).apply(variables, images.astype(jnp.float32) / 255.0, train=True,
                                    mutable=["batch_stats"])
        shard_sums = [losses.triplet_loss_sums(emb[i * b:(i + 1) * b], labels[i * b:(i + 1) * b],
                                               anchor_start=0, num_anchors=b, margin=0.5,
                                               strategy="hardest", distance="squared")
                      for i in range(NUM_DEVICES)]
        total = jax.tree.map(lambda *xs: sum(xs), *shard_sums)
        return (losses.reduce_triplet_sums(total)[0],
                losses.triplet_loss(emb, labels, margin=0.5, strategy="hardest")[0])

    expected, global_expected = per_shard_and_global_losses(state.variables, images, labels)

    mesh, step = _sharded_step(loss, "local", tx)
    _, metrics = step(parallel.put_replicated(state, mesh), images, labels)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=RTOL, atol=ATOL)
    assert abs(float(expected) - float(global_expected)) > 1e-4, "scopes must differ here"


def test_one_device_and_eight_give_the_same_step():
    """The same jitted step over global arrays on a 1-device and an 8-device mesh: the
    parameters and the momentum agree (jit's partitioning changes where things run, not what),
    with dropout too: its masks are drawn over the global batch from the step's key, whatever
    the device count. (Not Adam: its first update is ~lr·sign(g), so a gradient of ~1e-8 that
    differs in its last bits between the two reductions moves a parameter by a different ±lr.)"""
    tx = optax.sgd(0.5, momentum=0.9)
    loss = LossSpec(strategy="semihard", margin=0.2, distance="squared", soft=False)
    images, labels = _batch(2)
    state = _state(tx)
    dropped = _model(None).clone(dropout_rate=0.5)
    results = {}
    for devices in (1, NUM_DEVICES):
        mesh, step = _sharded_step(loss, "global", tx, num_devices=devices, model=dropped)
        results[devices] = step(parallel.put_replicated(state, mesh), images, labels)
    (one, one_metrics), (eight, eight_metrics) = results[1], results[NUM_DEVICES]
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=1e-5, atol=1e-6)
    _assert_tree_close(eight.params, one.params, "params")
    _assert_tree_close(eight.opt_state, one.opt_state, "opt_state")
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4, "the step must move the parameters"


def test_step_compiles_once():
    tx = optax.adam(1e-3)
    loss = LossSpec(strategy="semihard", margin=0.2, distance="squared", soft=False)
    mesh, step = _sharded_step(loss, "global", tx)
    state = parallel.put_replicated(_state(tx), mesh)
    for seed in range(3):
        images, labels = _batch(seed)
        batch = parallel.put_global_batch((images, labels), mesh)
        state, _ = step(state, *batch)
    assert int(state.step) == 3
    assert step._cache_size() == 1
