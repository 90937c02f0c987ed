"""The registries (facenet_jax/registry.py): the table itself, and that validation and every
dispatch read them (a toy entry registered here becomes valid everywhere, then is gone)."""

import dataclasses
import pathlib
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from facenet_jax import config as cfg
from facenet_jax import data, explore, losses, models, optim
from facenet_jax.eval import evaluators
from facenet_jax.losses import mining
from facenet_jax.registry import Registry
from facenet_jax.state import build_model
from facenet_jax.train.validate import validate_run_config

DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"


# --- the table -------------------------------------------------------------------------------

def test_registry_order_lookup_and_errors():
    table = Registry("widget")
    assert table.names() == ()
    first = table.add("b", 1)

    @table.register("a")
    def builder():
        return 2

    assert first == 1 and builder() == 2  # add and the decorator return what they register
    assert table.names() == ("b", "a")  # registration order, not sorted
    assert table.get("a") is builder and "b" in table and "c" not in table
    assert [] not in table  # an unhashable name is simply absent
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; valid names: b, a$"):
        table.get("c")
    with pytest.raises(ValueError, match=r"^unknown config.x \['a'\]; valid names: b, a$"):
        table.get(["a"], key="config.x")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        table.add("a", 3)
    assert table.get("a") is builder  # the first registration stands
    with pytest.raises(ValueError, match="non-empty string"):
        table.add("", 3)
    listing = Registry("strategy", valid="valid strategies")
    listing.add("x", 0)
    with pytest.raises(ValueError, match=r"^unknown strategy 'y'; valid strategies: x$"):
        listing.get("y")


def test_temporary_registration_is_undone_even_on_error():
    table = Registry("widget")
    table.add("kept", 0)
    with pytest.raises(RuntimeError):
        with table.temporary("toy", 1):
            assert table.names() == ("kept", "toy")
            raise RuntimeError
    assert table.names() == ("kept",)
    assert table.remove("kept") == 0 and table.names() == ()


def test_the_old_name_constants_are_the_registered_names_in_their_old_order():
    assert models.MODEL_NAMES == models.ENCODERS.names() == (
        "small_cnn", "resnet18", "resnet34", "resnet50", "inception_resnet_v1", "iresnet50",
        "iresnet100", "mobilefacenet")
    assert data.SOURCES == data.DATA_SOURCES.names() == ("synthetic", "folder", "tfds", "rec")
    assert losses.STRATEGIES == losses.MINING_STRATEGIES.names() == (
        "semihard", "semihard_facenet", "hardest", "all", "random", "distance_weighted")
    assert losses.STRATEGY_OPTIONS == {
        "semihard": {"max_positives": None},
        "distance_weighted": {"cutoff": 0.5, "nonzero_loss_cutoff": 1.4}}
    assert [n for n in losses.STRATEGIES if losses.MINING_STRATEGIES.get(n).needs_key] == [
        "semihard_facenet", "random", "distance_weighted"]
    assert optim.OPTIMIZER_NAMES == optim.OPTIMIZERS.names() == ("adagrad", "adam", "adamw",
                                                                  "sgd")
    assert optim.SCHEDULE_NAMES == optim.SCHEDULES.names() == ("cosine", "piecewise",
                                                                "constant")
    assert evaluators.EVALUATORS.names() == ("finetune_baseline", "validation",
                                             "verification_sets", "test", "run_split", "ijb",
                                             "pixels", "load_and_eval")
    assert evaluators.end_entries() == ("validation", "test")
    assert evaluators.BASELINES == ("pixels",)


# --- every dispatch reads its table ----------------------------------------------------------

class _Toy(nn.Module):
    """A toy encoder: mean colour × `gain` → a fixed linear map; no BatchNorm."""

    embedding_dim: int = 8
    dtype: object = jnp.float32
    bn_axis_name: str | None = None
    input_norm: str = "symmetric"
    gain: float = 1.0

    @nn.compact
    def __call__(self, images, train):
        x = self.gain * jnp.mean(images, axis=(1, 2))
        return models.l2_normalize(nn.Dense(self.embedding_dim)(x))


def test_a_registered_encoder_is_valid_buildable_and_gone_after():
    config = cfg.load_config(DEFAULT, {"model.embedding_dim": 8})
    config.model.name = "toy"
    with pytest.raises(ValueError, match="unknown model.name 'toy'; valid names: small_cnn"):
        validate_run_config(config, num_devices=1)
    with models.ENCODERS.temporary("toy", models.EncoderSpec(_Toy)):
        assert models.default_fields("toy") == {"gain": 1.0}
        validate_run_config(config, num_devices=1)  # no block yet: the defaults
        config.model.toy = ml_collections.ConfigDict({"gain": 3.0})
        validate_run_config(config, num_devices=1)
        model = build_model(config, bn_axis_name=None)
        assert isinstance(model, _Toy) and model.gain == 3.0 and model.embedding_dim == 8
        out = model.apply(model.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)), train=False),
                          jnp.ones((2, 4, 4, 3)), train=False)
        assert out.shape == (2, 8)
    with pytest.raises(ValueError, match="unknown model.name 'toy'"):
        validate_run_config(config, num_devices=1)


def _farthest_negative(inputs: losses.MiningInputs) -> mining.PairNegatives:
    """Per anchor-positive pair, the anchor's farthest negative (a toy strategy)."""
    column = jnp.argmax(jnp.where(inputs.negative, inputs.d, -jnp.inf), axis=1)
    has_term = inputs.positive & jnp.any(inputs.negative, axis=1, keepdims=True)
    none = jnp.zeros_like(has_term)
    return mining.PairNegatives(jnp.broadcast_to(column[:, None], inputs.d.shape), has_term,
                                none, none)


def test_a_registered_strategy_trains_validates_and_lists_its_triplets():
    emb = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    config = cfg.load_config(DEFAULT, {"loss.strategy": "farthest"})
    with pytest.raises(ValueError, match="valid strategies: semihard"):
        validate_run_config(config, num_devices=1)
    with losses.MINING_STRATEGIES.temporary("farthest", losses.Strategy(_farthest_negative)):
        validate_run_config(config, num_devices=1)
        loss, stats = losses.triplet_loss(jnp.asarray(emb), jnp.asarray(labels), margin=0.2,
                                          strategy="farthest")
        # Brute force: each ordered positive pair against the anchor's farthest negative.
        d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
        terms = [max(d[a, p] - d[a][labels != labels[a]].max() + 0.2, 0.0)
                 for a in range(8) for p in range(8) if p != a and labels[p] == labels[a]]
        np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5, atol=1e-6)
        assert stats["num_triplets"] == len(terms) == 8
        mined = explore.mined_triplets(emb, labels, margin=0.2, strategy="farthest")
        assert len(mined.anchor) == 8
        for a, n in zip(mined.anchor, mined.negative):
            assert d[a, n] == d[a][labels != labels[a]].max()
    with pytest.raises(ValueError, match="unknown strategy 'farthest'"):
        losses.triplet_loss(jnp.asarray(emb), jnp.asarray(labels), margin=0.2,
                            strategy="farthest")


def test_a_registered_data_source_is_what_load_dataset_loads():
    data_config = ml_collections.ConfigDict({"source": "two_people"})
    two = data.load_synthetic(2, 3, 8)
    with data.DATA_SOURCES.temporary("two_people", lambda config: two):
        assert data.load_dataset(data_config) is two
    with pytest.raises(ValueError, match="unknown data.source 'two_people'; valid sources: "
                                         "synthetic, folder, tfds"):
        data.load_dataset(data_config)


def test_a_registered_optimizer_and_schedule_build_the_update():
    config = cfg.load_config(DEFAULT, {"optimizer.name": "plain_sgd",
                                       "optimizer.schedule": "halved",
                                       "optimizer.warmup_steps": 0,
                                       "optimizer.grad_clip_norm": None,
                                       "optimizer.learning_rate": 0.5})
    with pytest.raises(ValueError, match="unknown optimizer.name 'plain_sgd'; valid names"):
        validate_run_config(config, num_devices=1)
    with optim.OPTIMIZERS.temporary("plain_sgd", lambda opt, schedule: optax.sgd(schedule)), \
            optim.SCHEDULES.temporary("halved", lambda opt, peak, *_: lambda step: peak / 2):
        validate_run_config(config, num_devices=1)
        tx = optim.make_optimizer(config.optimizer, config.num_steps)
        params = {"w": jnp.ones(3)}
        updates, _ = tx.update({"w": jnp.full(3, 2.0)}, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -0.25 * 2.0)  # -lr/2 · gradient


def test_a_registered_evaluator_runs_from_its_flag():
    """The evaluate command's refusals come from the entries: a flag no selected entry reads,
    an entry of another group, --output beside a second entry."""
    flags = types.SimpleNamespace(workdir="run", toy="DATA", verification_sets=None, ijb=None,
                                  data_root=None, pairs=None, output=None, baseline=None,
                                  fold=None, threshold=None, flip=None, names=None,
                                  run_config=None)
    assert [name for name, _ in evaluators.select_from_flags(flags)] == ["run_split"]
    calls = []
    toy = evaluators.Evaluator(
        flag="toy", flags=("workdir", "output"), writes="DIR/eval_toy.json", group="benchmark",
        run_flags=lambda flags: calls.append((flags.toy, flags.output)) or "toy summary")
    with evaluators.EVALUATORS.temporary("toy", toy):
        assert evaluators.select_from_flags(flags) == [("toy", toy)]
        assert toy.run_flags(flags) == "toy summary" and calls == [("DATA", None)]
        flags.pairs = "pairs.txt"  # the default mode's: refused, naming what --toy writes
        with pytest.raises(ValueError, match=r"--pairs: not used with --toy \(it writes "
                                             r"DIR/eval_toy.json\): run them as a separate"):
            evaluators.select_from_flags(flags)
        flags.pairs, flags.baseline = None, "pixels"  # entries of two groups: the first runs
        with pytest.raises(ValueError, match="--toy: not used with --baseline pixels"):
            evaluators.select_from_flags(flags)
        flags.verification_sets = "SETS"
        with pytest.raises(ValueError, match="--baseline: not used with --verification_sets / "
                                             "--toy"):
            evaluators.select_from_flags(flags)
        flags.baseline, flags.verification_sets = None, None
        # --output goes to the one entry that runs; with two it would name two files.
        flags.baseline, flags.output = None, "x.json"
        assert evaluators.select_from_flags(flags) == [("toy", toy)]
        flags.verification_sets = "SETS"
        with pytest.raises(ValueError, match="--output names one file, but 2 benchmarks run"):
            evaluators.select_from_flags(flags)
        flags.output, flags.names = None, "lfw"  # read by --verification_sets: taken
        assert [name for name, _ in evaluators.select_from_flags(flags)] == [
            "verification_sets", "toy"]
    flags.verification_sets, flags.names, flags.flip = None, None, True
    with pytest.raises(ValueError, match="--flip: not used with --workdir DIR alone"):
        evaluators.select_from_flags(flags)  # the default mode embeds as the run's eval.flip


def test_an_evaluation_only_run_takes_only_what_the_end_of_training_runs(tmp_path):
    with pytest.raises(ValueError, match="--evaluators finetune_baseline: not an evaluation "
                                         "the end of training runs; choose from validation, "
                                         "test"):
        evaluators.load_and_eval(tmp_path / "never_read", ["test", "finetune_baseline"])
    with pytest.raises(ValueError, match="holds no split.json"):
        evaluators.load_and_eval(tmp_path, ["test"])


def test_training_runs_the_entries_its_config_selects_by_phase(tmp_path):
    """One loop: `prepare` keeps the entries the config selects (in registration order),
    `run_phase` runs those of a phase; the validation entry logs what the pairs evaluation of
    the validation split computes, the fine-tune baseline does so at step 0."""
    from tiny import tiny_config

    from facenet_jax.eval import evaluate, metrics

    config = tiny_config()
    splits = data.split_dataset(data.load_dataset(config.data), config.data)
    ran = []
    toy = evaluators.Evaluator(when=("every", "end"), prepare=lambda inputs: (
        lambda context: ran.append((context.phase, context.step)) or {"toy": 1.0}))
    with evaluators.EVALUATORS.temporary("toy", toy):
        prepared = evaluators.prepare(config, splits)
    assert [entry.name for entry in prepared] == ["validation", "test", "toy"]
    rows = []
    writer = types.SimpleNamespace(write=lambda step, values: rows.append((step, values)))
    embed = lambda variables, images: evaluate.pixel_embeddings(images)  # noqa: E731
    context = evaluators.EvalContext(step=4, variables=None, embed=embed, phase="start",
                                     writer=writer, workdir=tmp_path, is_writer=False)
    assert evaluators.run_phase(prepared, "start", context) == {} and not rows
    results = evaluators.run_phase(prepared, "every", context)
    assert list(results) == ["validation", "toy"] and ran == [("every", 4)]
    expected = evaluate.evaluate_dataset(
        embed, None, splits["validation"],
        evaluate.generated_pairs(config, splits["validation"], "validation"),
        **metrics.protocol_options(config.eval))
    assert results["validation"] == expected
    assert rows == [(4, evaluators.logged_numbers("eval", expected))]
    assert all(key.startswith("eval/") for key in rows[0][1]) and "eval/accuracy" in rows[0][1]
    with pytest.raises(ValueError, match="unknown evaluation phase 'later'"):
        evaluators.run_phase(prepared, "later", context)
    finetune = evaluators.prepare(tiny_config({"model.init_from": str(tmp_path)}), splits)
    assert [entry.name for entry in finetune] == ["finetune_baseline", "validation", "test"]
    rows.clear()
    assert list(evaluators.run_phase(finetune, "start", dataclasses.replace(
        context, step=0))) == ["finetune_baseline"]
    assert rows == [(0, evaluators.logged_numbers("eval", expected))]


def test_encoder_registration_checks_its_fields():
    with pytest.raises(ValueError, match="not fields of _Toy"):
        models.register_encoder("bad_toy", depth=3)(_Toy)
    with pytest.raises(ValueError, match="field 'stage_sizes' of ResNet has no default"):
        models.register_encoder("bad_toy", fixed={"block": models.BasicBlock})(models.ResNet)
    with pytest.raises(ValueError, match="model name 'small_cnn' is already registered"):
        models.register_encoder("small_cnn")(_Toy)
    assert "bad_toy" not in models.ENCODERS and models.ENCODERS.get("small_cnn").module is \
        models.SmallCNN
