"""Cross-batch memory: the FIFO by hand, the memory loss against brute force, the train step
with memory on 1 and 8 devices against a one-device reference, resume, and size 0 = no memory.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from facenet_jax import config as config_lib
from facenet_jax import losses, models, parallel
from facenet_jax.losses import memory as xbm
from facenet_jax.state import TrainState, create_train_state
from facenet_jax.train import LossSpec, make_train_step
from facenet_jax.train.validate import validate_run_config

KEY = jax.random.key(3)
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"


# --- the FIFO -------------------------------------------------------------------------------

def test_enqueue_is_a_fifo_that_overwrites_the_oldest_first():
    memory = xbm.init_memory(6, 2)
    assert not memory.valid.any() and int(memory.position) == 0
    batches = [(np.full((4, 2), i + 1, np.float32), np.arange(4) + 10 * (i + 1))
               for i in range(3)]
    memory = xbm.enqueue(memory, *map(jnp.asarray, batches[0]))
    np.testing.assert_array_equal(memory.labels, [10, 11, 12, 13, 0, 0])
    np.testing.assert_array_equal(memory.valid, [1, 1, 1, 1, 0, 0])
    assert int(memory.position) == 4
    memory = xbm.enqueue(memory, *map(jnp.asarray, batches[1]))  # wraps: 2 at the end, 2 at 0
    np.testing.assert_array_equal(memory.labels, [22, 23, 12, 13, 20, 21])
    np.testing.assert_array_equal(memory.embeddings[:, 0], [2, 2, 1, 1, 2, 2])
    assert memory.valid.all() and int(memory.position) == 2
    memory = xbm.enqueue(memory, *map(jnp.asarray, batches[2]))
    np.testing.assert_array_equal(memory.labels, [22, 23, 30, 31, 32, 33])
    assert int(memory.position) == 0
    with pytest.raises(ValueError, match="cannot enqueue 7 embeddings into a memory of 6"):
        xbm.enqueue(memory, jnp.zeros((7, 2)), jnp.zeros(7, jnp.int32))


def test_enqueue_from_waits_for_start_step():
    memory = xbm.init_memory(4, 2)
    step = jax.jit(xbm.enqueue_from, static_argnums=4)
    batch = (jnp.ones((2, 2)), jnp.arange(2))
    assert not step(memory, *batch, 2, 3).valid.any()
    assert int(step(memory, *batch, 3, 3).valid.sum()) == 2


# --- the memory loss against brute force ----------------------------------------------------

def _brute_force_memory_loss(batch, batch_labels, bank, bank_labels, valid, margin, strategy):
    """(mean loss, number of terms): each batch anchor against the valid memory rows only,
    squared distances in float64, one candidate at a time."""
    terms = []
    for a in range(len(batch)):
        d = {j: float(np.sum((batch[a].astype(np.float64) - bank[j]) ** 2))
             for j in range(len(bank)) if valid[j]}
        positives = [j for j in d if bank_labels[j] == batch_labels[a]]
        negatives = [j for j in d if bank_labels[j] != batch_labels[a]]
        if not negatives or not positives:
            continue
        if strategy == "hardest":
            terms.append(max(max(d[p] for p in positives) + margin
                             - min(d[n] for n in negatives), 0.0))
            continue
        for p in positives:
            if strategy == "all":
                terms += [d[p] + margin - d[n] for n in negatives if d[n] < d[p] + margin]
                continue
            farther = [d[n] for n in negatives if d[n] > d[p]]
            d_an = min(farther) if farther else max(d[n] for n in negatives)
            terms.append(max(d[p] + margin - d_an, 0.0))
    return (sum(terms) / len(terms) if terms else 0.0), len(terms)


@pytest.mark.parametrize("strategy", ["semihard", "hardest", "all"])
def test_memory_loss_matches_brute_force_and_ignores_empty_slots(strategy):
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa
    batch, batch_labels = unit(rng.normal(size=(8, 4))), np.repeat(np.arange(4), 2)
    memory = xbm.enqueue(xbm.init_memory(16, 4), jnp.asarray(unit(rng.normal(size=(11, 4)))),
                         jnp.asarray(rng.integers(0, 5, 11)))
    # Stale rows in the empty slots would change the loss if they were read.
    memory = memory.replace(embeddings=memory.embeddings.at[11:].set(batch[:5]),
                            labels=memory.labels.at[11:].set(batch_labels[:5]))

    def loss(e):
        sums = xbm.memory_loss_sums(e, jnp.asarray(batch_labels), memory, anchor_start=0,
                                    num_anchors=8, margin=0.5, strategy=strategy)
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

    (value, sums), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(batch))
    ref, count = _brute_force_memory_loss(batch, batch_labels, np.asarray(memory.embeddings),
                                          np.asarray(memory.labels), np.asarray(memory.valid),
                                          0.5, strategy)
    assert count > 0 and float(sums["count"]) == count
    np.testing.assert_allclose(value, ref, rtol=2e-5, atol=1e-6)
    assert np.abs(np.asarray(grad)).sum() > 0
    # The memory is detached: no gradient reaches it.
    memory_grad = jax.jit(jax.grad(lambda bank: xbm.memory_loss_sums(
        jnp.asarray(batch), jnp.asarray(batch_labels), memory.replace(embeddings=bank),
        anchor_start=0, num_anchors=8, margin=0.5, strategy=strategy)["loss_sum"]))(
            memory.embeddings)
    assert not np.asarray(memory_grad).any()


@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_every_strategy_mines_against_the_memory(strategy):
    """Pair strategies: one term per (batch anchor, memory positive) whose anchor has a memory
    negative (FaceNet's band: those that found one); an empty memory gives zero sums."""
    labels = jnp.repeat(jnp.arange(4), 2)
    emb = jax.random.normal(KEY, (8, 4))
    emb = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    full = xbm.enqueue(xbm.init_memory(12, 4), jnp.roll(emb, 1, axis=0) * 0.9 + 0.1,
                       labels)
    for memory, expected in ((xbm.init_memory(12, 4), 0), (full, None)):
        sums = jax.jit(functools.partial(
            xbm.memory_loss_sums, anchor_start=0, num_anchors=8, margin=0.2,
            strategy=strategy, key=KEY))(emb, labels, memory)
        assert all(np.isfinite(float(v)) for v in sums.values())
        if expected == 0:
            assert float(sums["count"]) == 0 and float(sums["loss_sum"]) == 0
        elif strategy in ("semihard", "random", "distance_weighted"):
            assert float(sums["num_triplets"]) == 16  # each anchor: 2 memory positives
        else:
            assert float(sums["num_triplets"]) > 0


# --- the train step with memory --------------------------------------------------------------

P_IDS, K, SIZE, DIM, MEMORY = 8, 2, 16, 8, 32


def _images(seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (P_IDS * K, SIZE, SIZE, 3), dtype=np.uint8),
            np.repeat(rng.permutation(20)[:P_IDS], K).astype(np.int32))


def _memory_state(tx):
    model = models.create_model("small_cnn", embedding_dim=DIM, bn_axis_name=None)
    variables = model.init(jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 3)), train=False)
    params = {"encoder": variables["params"], "head": {}}
    return jax.device_get(TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        opt_state=tx.init(params), extra=xbm.init_memory(MEMORY, DIM),
        rng=jax.random.PRNGKey(1)))


@functools.cache
def _step(num_devices, strategy, start_step):
    tx = optax.sgd(0.5)
    loss = LossSpec(strategy=strategy, margin=0.5, distance="squared", soft=False,
                    memory=xbm.MemorySpec(size=MEMORY, start_step=start_step, weight=0.7))
    model = models.create_model("small_cnn", embedding_dim=DIM, bn_axis_name=None)
    mesh = parallel.make_mesh(num_devices)
    step = make_train_step(mesh, model=model, tx=tx, schedule=optax.constant_schedule(0.5),
                           loss=loss, mining="global")
    return mesh, step, tx


def _run(num_devices, strategy="semihard", steps=3, start_step=0):
    mesh, step, tx = _step(num_devices, strategy, start_step)
    state = parallel.put_replicated(_memory_state(tx), mesh)
    history = []
    for s in range(steps):
        images, labels = _images(s)
        state, metrics = step(state, images, labels)
        history.append((jax.device_get(state), jax.device_get(metrics)))
    return history


@pytest.mark.slow
def test_train_step_memory_on_8_devices_matches_a_one_device_brute_force_reference():
    """With start_step = 1, on 8 devices: step 0 neither mines the (empty) memory nor
    enqueues; step s mines against the embeddings of steps 1..s-1 (FIFO, enqueued after each
    step). Each step's batch loss and memory loss equal those computed on one device, without
    collectives, from the batch embedded with the step's parameters (global-batch BN): the batch
    loss by `triplet_loss`, the memory loss by brute force against the previous memory."""
    model = models.create_model("small_cnn", embedding_dim=DIM, bn_axis_name=None)
    batch_loss = jax.jit(lambda e, l: losses.triplet_loss(e, l, margin=0.5,
                                                          strategy="semihard")[0])
    embed = jax.jit(lambda variables, images: model.apply(  # eager: every op per device
        variables, images, train=True, mutable=["batch_stats"])[0])
    previous = _memory_state(optax.sgd(0.5))
    for s, (state, metrics) in enumerate(_run(8, start_step=1)):
        images, labels = _images(s)
        embeddings = embed(previous.variables, images.astype(np.float32) / 255.0)
        np.testing.assert_allclose(metrics["loss"], batch_loss(embeddings, labels), rtol=2e-4,
                                   atol=2e-6)
        memory = previous.extra
        ref, count = _brute_force_memory_loss(
            np.asarray(embeddings), labels, np.asarray(memory.embeddings),
            np.asarray(memory.labels), np.asarray(memory.valid), 0.5, "semihard")
        np.testing.assert_allclose(metrics["memory_loss"], ref, rtol=2e-4, atol=2e-6)
        assert (count > 0) == (s > 1)
        if s == 0:
            assert not state.extra.valid.any()
        else:  # FIFO: this step's batch now sits at slots [16 (s-1), 16 s) mod 32.
            slots = (np.arange(P_IDS * K) + P_IDS * K * (s - 1)) % MEMORY
            np.testing.assert_array_equal(state.extra.labels[slots], labels)
            np.testing.assert_allclose(state.extra.embeddings[slots], embeddings, rtol=1e-4,
                                       atol=1e-5)
            assert int(state.extra.valid.sum()) == P_IDS * K * s
        np.testing.assert_allclose(metrics["memory_fill"], memory.valid.mean())
        previous = state
    assert ref > 0


# --- config, size 0, resume ------------------------------------------------------------------

def _config(**memory):
    config = config_lib.load_config(DEFAULT_CONFIG)
    for key, value in memory.items():
        config.loss.memory[key] = value
    return config


def test_size_zero_is_no_memory():
    config = _config()
    assert config.loss.memory.size == 0
    assert LossSpec.from_config(config.loss).memory is None
    model = models.create_model("small_cnn", embedding_dim=8, bn_axis_name=None)
    state = jax.eval_shape(lambda: create_train_state(config, model, optax.sgd(0.1)))
    assert state.extra == {}  # no memory buffer in the tree
    with_memory = config_lib.to_plain(_config(size=64))
    assert config_lib.changed_keys(config_lib.to_plain(config), with_memory) == [
        "loss.memory.size"]


@pytest.mark.parametrize("memory, message", [
    ({"size": -1}, "size must be an int >= 0"),
    ({"size": 100}, "below the global batch of 128"),
    ({"size": 256, "start_step": -1}, "start_step must be an int >= 0"),
    ({"size": 256, "weight": -0.5}, "weight must be a finite number >= 0"),
])
def test_bad_memory_config_is_an_error_before_any_work(memory, message):
    with pytest.raises(ValueError, match=message):
        validate_run_config(_config(**memory), num_devices=1)


@pytest.mark.slow
def test_resume_restores_the_memory_bit_exactly(tmp_path):
    """Two steps, a checkpoint, a restore into the state `create_train_state` builds for a
    config with memory (what the train CLI restores into), two more steps: the memory and the
    parameters equal, bit for bit, those of four uninterrupted steps."""
    from facenet_jax import checkpoints

    mesh, step, tx = _step(8, "semihard", 1)
    straight = _run(8, steps=4, start_step=1)[-1][0]
    state = parallel.put_replicated(_memory_state(tx), mesh)
    for s in range(2):
        state, _ = step(state, *_images(s))
    checkpoints.save(checkpoints.make_manager(tmp_path, max_to_keep=2), 2, state)

    config = _config(size=MEMORY)
    config.model.embedding_dim, config.data.image_size = DIM, SIZE
    model = models.create_model("small_cnn", embedding_dim=DIM, bn_axis_name=None)
    target = create_train_state(config, model, tx)
    assert isinstance(target.extra, xbm.CrossBatchMemory) and not target.extra.valid.any()
    assert target.extra.embeddings.shape == (MEMORY, DIM)
    restored, reached = checkpoints.restore_latest(
        checkpoints.make_manager(tmp_path, max_to_keep=2, read_only=True),
        parallel.put_replicated(target, mesh))
    assert reached == 2
    for s in range(2, 4):
        restored, _ = step(restored, *_images(s))
    assert int(straight.extra.valid.sum()) == MEMORY  # steps 1, 2, 3 enqueued: wrapped
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)
