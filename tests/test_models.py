"""Encoders: shapes, unit norms, parameter counts, bf16 compute, global-batch BatchNorm, bad input.

References are independent of the code under test: torchvision's published ResNet parameter
counts (adjusted by hand for the face stem and the embedding head), a one-device run on the whole
batch for the 8-device global BN, the float32 model for bfloat16 compute.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from facenet_jax import models

NUM_DEVICES = 8
EMBEDDING_DIM = 16
# Smallest convenient input of each model (the big nets compile once each, at batch 2). The
# face backbones (iresnet50/100, mobilefacenet) have these checks in test_backbones.py.
SMALL_SIZES = {"small_cnn": 32, "resnet18": 32, "resnet34": 32, "resnet50": 32,
               "inception_resnet_v1": 75}
# The forward test runs the deep nets with one block per repeated stage (every module type, a
# fraction of the compile time); their published depths (Inception-ResNet-v1's 5/10/5,
# ResNet-34's and -50's 3/4/6/3) are checked, without a compile, by the parameter counts (and
# Inception-ResNet-v1's BN-layer count).
FORWARD_FIELDS = {"inception_resnet_v1": {"block35_repeats": 1, "block17_repeats": 1,
                                          "block8_repeats": 1},
                  "resnet34": {"stage_sizes": (1, 1, 1, 1)},
                  "resnet50": {"stage_sizes": (1, 1, 1, 1)}}
BACKBONES = ("iresnet50", "iresnet100", "mobilefacenet")


def _images(n, size, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (n, size, size, 3), jnp.float32)


def _num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _jit_apply(model, *, train):
    """model.apply compiled once: eval -> embeddings; train -> (embeddings, batch_stats updates)."""
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def _abstract_variables(model, size):
    """Variable shapes from tracing alone (no compile)."""
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False))


def test_every_encoder_is_checked_here_or_in_test_backbones():
    assert set(models.MODEL_NAMES) == set(SMALL_SIZES) | set(BACKBONES)


def test_model_names_and_unknown_name():
    assert models.MODEL_NAMES == ("small_cnn", "resnet18", "resnet34", "resnet50",
                                  "inception_resnet_v1", "iresnet50", "iresnet100",
                                  "mobilefacenet")
    with pytest.raises(ValueError, match="unknown model name 'resnet101'") as error:
        models.create_model("resnet101")
    for name in models.MODEL_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", [  # the fast tier: small_cnn and resnet18
    pytest.param(name, marks=() if name in ("small_cnn", "resnet18") else pytest.mark.slow)
    for name in SMALL_SIZES])
def test_forward_shapes_unit_norm_and_running_stats(name):
    """Init, eval and train forward of every model: [N, D] float32 unit rows, BN updates."""
    model = models.create_model(name, embedding_dim=EMBEDDING_DIM, **FORWARD_FIELDS.get(name, {}))
    images = _images(2, SMALL_SIZES[name])

    def run(images):
        variables = model.init(jax.random.PRNGKey(0), images, train=False)
        eval_out = model.apply(variables, images, train=False)
        train_out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return variables, eval_out, train_out, updates

    # One compile per model; XLA's backend optimisations off (same results) keeps the big nets'
    # compile time down.
    compiled = jax.jit(run).lower(images).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    variables, eval_out, train_out, updates = compiled(images)
    assert set(variables) == {"params", "batch_stats"}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    for out in (eval_out, train_out):
        assert out.shape == (2, EMBEDDING_DIM) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-5)
    # Two different images must not collapse to one point at initialisation.
    assert float(jnp.sum(eval_out[0] * eval_out[1])) < 0.9999
    # Training moves the running averages; eval used them (fresh stats: mean 0, var 1).
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))


def test_parameter_counts_match_published_architectures():
    """ResNets: torchvision's counts (fc removed), with the face stem and head applied by hand.

    torchvision resnet18/34/50 have 11,689,512 / 21,797,672 / 25,557,032 parameters including
    a 1000-way fc (in_features·1000 + 1000). Ours: a 3×3 stem instead of 7×7
    (-(49-9)·3·64 = -7,680), a strided stage 1 that needs a 1×1 projection + BN in the
    basic-block nets (+64·64 + 128),
    BN on the pooled features (+2·C) and a 128-d linear head (C·128 + 128).
    """
    def expected(torchvision_total, features, basic_block):
        backbone = torchvision_total - (features * 1000 + 1000) - 7_680
        projection = 64 * 64 + 2 * 64 if basic_block else 0
        return backbone + projection + 2 * features + features * 128 + 128

    counts = {name: _num_params(_abstract_variables(models.create_model(name), size)["params"])
              for name, size in [("resnet18", 112), ("resnet34", 112), ("resnet50", 112),
                                 ("inception_resnet_v1", 160), ("small_cnn", 32)]}
    assert counts["resnet18"] == expected(11_689_512, 512, True) == 11_239_744
    assert counts["resnet34"] == expected(21_797_672, 512, True) == 21_347_904
    assert counts["resnet50"] == expected(25_557_032, 2048, False) == 23_766_720
    # facenet's 128-d Inception-ResNet-v1 has about 23 M parameters (BN offsets only, no scale).
    assert 22_500_000 < counts["inception_resnet_v1"] < 23_100_000
    assert counts["small_cnn"] < 500_000  # the CPU default stays small


def test_parameter_counts_do_not_depend_on_image_size():
    """Global average pooling: the same variables serve 112 and 160 px crops."""
    for name in ("resnet18", "inception_resnet_v1"):
        model = models.create_model(name)
        shapes = [jax.tree.map(lambda leaf: leaf.shape, _abstract_variables(model, size))
                  for size in (112, 160)]
        assert shapes[0] == shapes[1]


def test_bfloat16_compute_float32_params_and_outputs():
    images = _images(8, 32, seed=1)
    f32 = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM)
    bf16 = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM, dtype=jnp.bfloat16)
    variables = jax.jit(lambda x: bf16.init(jax.random.PRNGKey(0), x, train=False))(images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))

    for train in (False, True):
        reference = _jit_apply(f32, train=train)(variables, images)
        out = _jit_apply(bf16, train=train)(variables, images)
        if train:
            (reference, _), (out, _) = reference, out
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-6)
        difference = float(jnp.max(jnp.abs(out - reference)))
        assert 0.0 < difference < 0.05, difference  # bf16 really ran, and stayed close

    # The convolutions themselves run in bfloat16.
    jaxpr = jax.make_jaxpr(lambda v, x: bf16.apply(v, x, train=False))(variables, images)
    conv_dtypes = {eqn.invars[0].aval.dtype for eqn in jaxpr.jaxpr.eqns
                   if eqn.primitive.name == "conv_general_dilated"}
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}


def _mesh():
    return jax.make_mesh((NUM_DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


def _sharded_train_forward(model):
    """Train-mode forward with the batch split over 8 devices; stats averaged back over them."""
    def per_device(variables, images):
        embeddings, updates = model.apply(variables, images, train=True,
                                          mutable=["batch_stats"])
        # Identical on every device when BN is global; the mean shows the difference otherwise.
        return embeddings, jax.lax.pmean(updates["batch_stats"], "batch")

    return jax.jit(jax.shard_map(per_device, mesh=_mesh(), in_specs=(P(), P("batch")),
                                 out_specs=(P("batch"), P()), check_vma=False))


def test_global_batch_norm_over_8_devices_equals_one_device():
    assert jax.device_count() >= NUM_DEVICES, "tests/conftest.py sets 8 CPU devices"
    # Per-device shards of 2 images that differ strongly in brightness: local statistics differ.
    images = _images(2 * NUM_DEVICES, 32, seed=2) * jnp.repeat(
        jnp.linspace(0.2, 1.0, NUM_DEVICES), 2)[:, None, None, None]
    reference_model = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM)
    variables = jax.jit(lambda x: reference_model.init(jax.random.PRNGKey(0), x,
                                                       train=False))(images)
    reference, reference_updates = _jit_apply(reference_model, train=True)(variables, images)

    global_bn = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM,
                                    bn_axis_name="batch")
    embeddings, batch_stats = _sharded_train_forward(global_bn)(variables, images)
    np.testing.assert_allclose(embeddings, reference, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 batch_stats, reference_updates["batch_stats"])

    local_bn = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM)
    local_embeddings, local_stats = _sharded_train_forward(local_bn)(variables, images)
    assert float(jnp.max(jnp.abs(local_embeddings - reference))) > 1e-2
    # Means of local means equal the global mean; the variances are what local BN gets wrong.
    assert any(not np.allclose(a, b, rtol=1e-3)
               for a, b in zip(jax.tree.leaves(local_stats),
                               jax.tree.leaves(reference_updates["batch_stats"])))


def _count_primitive(jaxpr, name):
    """Occurrences of primitive `name` in a closed jaxpr, nested jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_primitive(inner, name)
    return count


@pytest.mark.parametrize("name", SMALL_SIZES)
def test_every_batch_norm_layer_syncs_over_the_axis(name):
    """Traced (not compiled) under shard_map: one cross-device mean per BN layer in training."""
    size = SMALL_SIZES[name]
    model = models.create_model(name, embedding_dim=EMBEDDING_DIM, bn_axis_name="batch")
    variables = _abstract_variables(model, size)
    num_bn_layers = len(jax.tree.leaves(variables["batch_stats"])) // 2  # mean and var each

    def traced(train):
        sharded = jax.shard_map(
            lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"])[0],
            mesh=_mesh(), in_specs=(P(), P("batch")), out_specs=P("batch"), check_vma=False)
        return jax.make_jaxpr(sharded)(variables, jnp.zeros((NUM_DEVICES, size, size, 3)))

    assert _count_primitive(traced(True).jaxpr, "psum") == num_bn_layers > 0
    assert _count_primitive(traced(False).jaxpr, "psum") == 0


@pytest.mark.parametrize("bad_shape, dtype, message", [
    ((2, 32, 32), jnp.float32, r"\[N, H, W, 3\]"),
    ((2, 32, 32, 1), jnp.float32, "RGB"),
    ((2, 32, 32, 3), jnp.uint8, "divide uint8 images by 255"),
    ((2, 8, 8, 3), jnp.float32, "at least 16x16 px"),
])
def test_bad_input_names_the_problem(bad_shape, dtype, message):
    model = models.create_model("small_cnn")
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), jnp.zeros(bad_shape, dtype), train=False)


def test_inception_resnet_v1_minimum_size():
    model = models.create_model("inception_resnet_v1")
    with pytest.raises(ValueError, match="at least 75x75 px, got 74x74"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 74, 74, 3)),
                                          train=False))


def test_l2_normalize_degenerate_rows_and_gradient():
    rows = jnp.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]])
    np.testing.assert_allclose(models.l2_normalize(rows), [[0.6, 0.8], [0, 0], [1e-24, 0]],
                               rtol=1e-6, atol=0)
    gradient = jax.grad(lambda r: jnp.sum(models.l2_normalize(r) ** 2))(rows)
    assert bool(jnp.all(jnp.isfinite(gradient)))
    assert models.l2_normalize(rows.astype(jnp.bfloat16)).dtype == jnp.float32


def test_constant_images_give_finite_unit_embeddings():
    """A blank batch (all pixels equal: zero BN variance in training) stays finite."""
    model = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM)
    images = jnp.full((4, 32, 32, 3), 0.5)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
    out, _ = _jit_apply(model, train=True)(variables, images)
    assert bool(jnp.all(jnp.isfinite(out)))
    norms = np.linalg.norm(np.asarray(out), axis=1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


def test_eval_mode_embeds_each_image_independently_of_its_batch():
    """Running averages in eval: an image's embedding does not depend on its batch mates."""
    model = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM)
    images = _images(6, 32, seed=3)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
    train, evaluate = _jit_apply(model, train=True), _jit_apply(model, train=False)
    _, updates = train(variables, images)
    variables = {"params": variables["params"], **updates}
    together = evaluate(variables, images)
    alone = jnp.concatenate([evaluate(variables, images[i:i + 1]) for i in range(6)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    trained_together, _ = train(variables, images)
    trained_half, _ = train(variables, images[:3])
    assert float(jnp.max(jnp.abs(trained_together[:3] - trained_half))) > 1e-3


def test_flip_sum_embedding_is_the_renormalised_sum():
    """eval.flip (mode "sum"): the image's and its mirror's embeddings added, back to unit norm
    (a float64 numpy reference)."""
    from facenet_jax import parallel
    from facenet_jax.eval.embed import make_embedder

    model = models.create_model("small_cnn", embedding_dim=EMBEDDING_DIM)
    images = np.asarray(_images(4, 32, seed=5) * 255, np.uint8)
    x = jnp.asarray(images, jnp.float32) / 255.0
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    got = make_embedder(model, parallel.make_mesh(1), batch_size=4, flip=True)(variables, images)
    evaluate = _jit_apply(model, train=False)
    summed = (np.asarray(evaluate(variables, x), np.float64)
              + np.asarray(evaluate(variables, x[:, :, ::-1, :]), np.float64))
    want = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    assert got.shape == (4, EMBEDDING_DIM)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.max(np.abs(summed / 2 - want)) > 1e-3  # the renormalisation is not a no-op


def test_input_norm_maps_pixels_as_named():
    from facenet_jax.models.layers import to_model_input

    pixels = jnp.array([0, 127.5, 255.0]).reshape(1, 1, 3, 1) / 255.0
    np.testing.assert_allclose(to_model_input(pixels, jnp.float32).ravel(), [-1, 0, 1],
                               atol=1e-6)
    np.testing.assert_allclose(
        to_model_input(pixels, jnp.float32, "fixed_standardization").ravel(),
        [-127.5 / 128, 0, 127.5 / 128], atol=1e-6)
    with pytest.raises(ValueError, match="unknown input_norm 'imagenet'"):
        to_model_input(pixels, jnp.float32, "imagenet")


def test_inception_bn_scale_option_adds_a_scale_to_every_batchnorm():
    shapes = {}
    for bn_scale in (False, True):
        model = models.create_model("inception_resnet_v1", bn_scale=bn_scale,
                                    block35_repeats=1, block17_repeats=1, block8_repeats=1)
        params = jax.eval_shape(lambda m=model: m.init(
            jax.random.PRNGKey(0), jnp.zeros((1, 80, 80, 3)), train=False))["params"]
        shapes[bn_scale] = {jax.tree_util.keystr(k) for k, _ in
                            jax.tree.leaves_with_path(params)}
    added = shapes[True] - shapes[False]
    batchnorms = {k for k in shapes[True] if "BatchNorm" in k or "embedding_bn" in k}
    assert added and all(k.endswith("['scale']") for k in added)
    assert len(added) == len({k for k in batchnorms if k.endswith("['bias']")})
