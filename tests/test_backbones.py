"""The field's face backbones: iresnet50, iresnet100 (insightface IR-ResNets) and mobilefacenet.

References are independent of the modules: parameter and multiply-accumulate counts written out
from insightface's PyTorch layout (arcface_torch `backbones/iresnet.py`, `mobilefacenet.py`)
as formulas, checked against the published figures (insightface's README: r50 6.3 and r100
12.1 GFLOPs, "mobilefacenet-0.45G"; Chen et al. 2018, Table 1: 0.99 M parameters, 221 M MAdds),
and XLA's own cost analysis. The big nets are only traced (jax.eval_shape / make_jaxpr); forward
passes run on narrow, shallow variants of the same modules.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_models import NUM_DEVICES, _count_primitive, _images, _mesh

from facenet_jax.models.complexity import count_macs, count_params, encoder_complexity
from facenet_jax.models.iresnet import IRESNET_STAGES, IResNet, iresnet50, iresnet100
from facenet_jax.models.layers import PReLU
from facenet_jax.models.mobilefacenet import MobileFaceNet, mobilefacenet

# Shallow, narrow variants of each module (every code path, milliseconds per forward).
SMALL = {
    "iresnet": IResNet(stage_sizes=(1, 2, 1, 1), widths=(8, 16, 16, 32), stem_width=8,
                       embedding_dim=16),
    "mobilefacenet": MobileFaceNet(scale=1, stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                                   down_inner_widths=(16, 32, 64),
                                   residual_inner_widths=(16, 16, 32, 32), stem_groups=8,
                                   feature_width=32, embedding_dim=16),
}


# --- insightface's PyTorch models, counted by hand -------------------------------------------

def _bn(channels):
    return 2 * channels  # weight and bias (running statistics are buffers, not parameters)


def insightface_iresnet(layers, size=112, embedding=512, widths=(64, 128, 256, 512)):
    """(parameters, MACs per image) of arcface_torch's IResNet(IBasicBlock, layers)."""
    params, macs = 9 * 3 * 64 + _bn(64) + 64, 9 * 3 * 64 * size ** 2  # conv1, bn1, prelu
    inplanes = 64
    for blocks, planes in zip(layers, widths):
        out = size // 2
        for index in range(blocks):
            # bn1, conv1 (3×3, stride 1), bn2, prelu, conv2 (3×3, stride 2 in block 0), bn3
            params += (_bn(inplanes) + 9 * inplanes * planes + _bn(planes) + planes
                       + 9 * planes * planes + _bn(planes))
            macs += 9 * inplanes * planes * (size if index == 0 else out) ** 2
            macs += 9 * planes * planes * out ** 2
            if index == 0:  # downsample: 1×1 conv stride 2 + BN
                params += inplanes * planes + _bn(planes)
                macs += inplanes * planes * out ** 2
            inplanes = planes
        size = out
    flat = widths[-1] * size ** 2
    # bn2, fc (with bias), features BN1d (its weight frozen at 1 but still a parameter)
    params += _bn(widths[-1]) + flat * embedding + embedding + _bn(embedding)
    return params, macs + flat * embedding


def insightface_mobilefacenet(blocks=(1, 4, 6, 2), scale=2, embedding=512, size=112):
    """(parameters, MACs per image) of arcface_torch's MobileFaceNet (get_mbf's defaults)."""
    totals = [0, 0]

    def conv(cin, cout, kernel, stride=1, groups=1, prelu=True, padding=None):
        nonlocal size
        padding = kernel // 2 if padding is None else padding
        size = (size + 2 * padding - kernel) // stride + 1
        weights = kernel * kernel * cin // groups * cout
        totals[0] += weights + _bn(cout) + (cout if prelu else 0)
        totals[1] += weights * size ** 2

    def depthwise(cin, cout, inner, stride):  # ConvBlock 1×1, ConvBlock dw 3×3, LinearBlock 1×1
        conv(cin, inner, 1)
        conv(inner, inner, 3, stride, groups=inner)
        conv(inner, cout, 1, prelu=False)

    c64, c128 = 64 * scale, 128 * scale
    conv(3, c64, 3, 2)
    if blocks[0] == 1:
        conv(c64, c64, 3, groups=64)
    else:
        for _ in range(blocks[0]):
            depthwise(c64, c64, 128, 1)
    for cin, cout, down_inner, residual_inner, count in [
            (c64, c64, 128, 128, blocks[1]), (c64, c128, 256, 256, blocks[2]),
            (c128, c128, 512, 256, blocks[3])]:
        depthwise(cin, cout, down_inner, 2)
        for _ in range(count):
            depthwise(cout, cout, residual_inner, 1)
    conv(c128, 512, 1)                                    # conv_sep
    conv(512, 512, 7, groups=512, prelu=False, padding=0)  # GDC: 7×7 map -> 1×1
    totals[0] += 512 * embedding + _bn(embedding)         # Linear without bias, BN1d
    return totals[0], totals[1] + 512 * embedding


def test_reference_formulas_reproduce_the_published_figures():
    """The hand counts above agree with what insightface and the paper publish."""
    r50, r100 = insightface_iresnet((3, 4, 14, 3)), insightface_iresnet((3, 13, 30, 3))
    assert r50 == (43_590_848, 6_309_330_944) and r100 == (65_156_160, 12_089_606_144)
    assert round(r50[1] / 1e9, 1) == 6.3 and round(r100[1] / 1e9, 1) == 12.1
    # The commonly quoted sizes (insightface's README gives none).
    assert round(r50[0] / 1e6, 1) == 43.6 and round(r100[0] / 1e6, 1) == 65.2
    # "mobilefacenet-0.45G": ptflops also counts BN and PReLU element-wise work (~3 %).
    mbf = insightface_mobilefacenet()
    assert mbf == (2_059_520, 437_520_896)
    # The paper's model: scale 1, 128-d. Table 1 says 0.99 M parameters and 221 M MAdds; the
    # PyTorch layout adds BN and PReLU parameters (1.3 % here).
    paper = insightface_mobilefacenet(scale=1, embedding=128)
    assert round(paper[1] / 1e6) == 221 and abs(paper[0] / 0.99e6 - 1) < 0.015


# --- our modules against them ----------------------------------------------------------------

@pytest.mark.parametrize("name, model, reference, missing", [
    # IResNet: no fc bias (BN follows) and no frozen embedding-BN weight: 2 × 512 fewer.
    ("iresnet50", iresnet50(), insightface_iresnet(IRESNET_STAGES["iresnet50"]), 1024),
    ("iresnet100", iresnet100(), insightface_iresnet(IRESNET_STAGES["iresnet100"]), 1024),
    ("mobilefacenet", mobilefacenet(), insightface_mobilefacenet(), 0),
    ("mobilefacenet paper", mobilefacenet(scale=1, embedding_dim=128),
     insightface_mobilefacenet(scale=1, embedding=128), 0),
    # get_mbf_large: stage 0 made of residual blocks instead of one grouped conv.
    ("mobilefacenet large", mobilefacenet(scale=4, stage_sizes=(2, 8, 12, 4)),
     insightface_mobilefacenet(blocks=(2, 8, 12, 4), scale=4), 0),
])
def test_parameters_and_macs_match_insightface(name, model, reference, missing):
    """Traced at 112 px, never run: same parameters (bar the documented redundant ones) and
    exactly the same multiply-accumulates as the PyTorch model."""
    measured = encoder_complexity(model, 112)
    assert measured["params"] == reference[0] - missing, name
    assert measured["macs"] == reference[1], name


def test_iresnet_output_layer_flattens_a_7x7_map_and_fixes_the_embedding_scale():
    variables = jax.eval_shape(lambda: iresnet50().init(
        jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)), train=False))
    head = variables["params"]["EmbeddingHead_0"]
    assert head["embedding"]["kernel"].shape == (7 * 7 * 512, 512)
    assert set(head["embedding"]) == {"kernel"} and set(head["embedding_bn"]) == {"bias"}
    learned = jax.eval_shape(lambda: iresnet50(fixed_embedding_scale=False).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)), train=False))
    assert set(learned["params"]["EmbeddingHead_0"]["embedding_bn"]) == {"bias", "scale"}
    # Per-channel PReLU everywhere: 64 slopes in the stem.
    assert variables["params"]["PReLU_0"]["negative_slope"].shape == (64,)


def test_count_macs_agrees_with_xla_cost_analysis():
    """XLA counts 2 flops per multiply-add, plus BN and PReLU element-wise work (a few %).

    mobilefacenet at 112 px: its 3×3 convs are depthwise, so XLA's skipping of padded taps
    (which our count, like ptflops and the papers, includes) stays negligible.
    """
    model = mobilefacenet()
    images = jnp.zeros((1, 112, 112, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))

    def apply(v, x):
        return model.apply(v, x, train=False)

    xla_flops = jax.jit(apply).lower(variables, images).cost_analysis()["flops"]
    macs = count_macs(jax.make_jaxpr(apply)(variables, images))
    assert 1.0 < xla_flops / (2 * macs) < 1.05


def test_count_macs_hand_computed_cases():
    x, kernel = jnp.zeros((2, 9, 9, 4)), jnp.zeros((3, 3, 1, 4))  # depthwise 3×3, stride 2
    conv = jax.make_jaxpr(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=4))(x, kernel)
    assert count_macs(conv) == 2 * 5 * 5 * 4 * 9
    nested = jax.make_jaxpr(lambda a, b: jax.jit(jnp.matmul)(a, b) + jnp.tanh(a @ b))(
        jnp.zeros((3, 5)), jnp.zeros((5, 7)))
    assert count_macs(nested) == 2 * 3 * 5 * 7
    assert count_params({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4)]}) == 10


# --- behaviour (small variants) --------------------------------------------------------------

def _run_once(fn, *args):
    """fn(*args) compiled once; XLA's backend optimisations off (same results, faster compile)."""
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)


@pytest.fixture(scope="module", params=[  # the fast tier: iresnet
    pytest.param(name, marks=() if name == "iresnet" else pytest.mark.slow) for name in SMALL])
def small_forward(request):
    """One compiled program per small model, shared by the behaviour tests below.

    Parameters drawn at random around their initial values (every BN scale and offset and
    PReLU slope distinct), so the PyTorch comparison sees per-channel values.
    """
    name = request.param
    model = SMALL[name]
    dropped = model.clone(dropout_rate=0.5)

    def run(variables, images):
        trained, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        updated = {"params": variables["params"], **updates}
        alone = jax.lax.map(lambda image: model.apply(updated, image[None], train=False)[0],
                            images)

        def train_dropped(key):
            return dropped.apply(variables, images, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": key})[0]

        half, _ = model.apply(variables, images[:3], train=True, mutable=["batch_stats"])
        return {
            "updates": updates, "trained": trained, "alone": alone, "half": half,
            "together": model.apply(updated, images, train=False),
            # Keys 1, 1, 2 under one vmap: a single traced copy of the network.
            "dropout": jax.vmap(train_dropped)(
                jax.vmap(jax.random.PRNGKey)(jnp.array([1, 1, 2]))),
            "dropout_eval": dropped.apply(updated, images, train=False)}

    images = _images(6, 32, seed=1)
    variables = _run_once(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    initial_dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
    # Perturbed on the host: random draws inside the compiled program cost ~7 s of compiling.
    rng = np.random.default_rng(1)
    variables = {**variables, "params": jax.tree.map(
        lambda leaf: leaf + rng.normal(0, 0.2, leaf.shape).astype(np.float32),
        variables["params"])}
    out = jax.tree.map(np.asarray, _run_once(run, variables, images))
    return name, images, {**out, "variables": variables, "initial_dtypes": initial_dtypes}


def test_forward_unit_embeddings_and_batch_norm_modes(small_forward):
    """Eval and train: [N, D] float32 unit rows; train uses (and updates) batch statistics,
    eval the running averages, so an image's eval embedding does not depend on its batch."""
    _, _, out = small_forward
    assert out["initial_dtypes"] == {np.dtype(np.float32)}
    for embeddings in (out["trained"], out["together"]):
        assert embeddings.shape == (6, 16) and embeddings.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(out["variables"]["batch_stats"]),
        jax.tree.leaves(out["updates"]["batch_stats"])))
    np.testing.assert_allclose(out["together"], out["alone"], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(out["trained"][:3] - out["half"])) > 1e-3


def test_dropout_needs_a_key_in_training_only(small_forward):
    """Rate 0 (the default) trains without a dropout key; rate 0.5 needs one, is deterministic
    per key, and leaves eval (no key) equal to the model without dropout."""
    name, images, out = small_forward
    plain, dropped = SMALL[name], SMALL[name].clone(dropout_rate=0.5)

    def train_without_key(module, variables):
        return module.apply(variables, images, train=True, mutable=["batch_stats"])

    variables = jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), images, train=False))
    jax.eval_shape(functools.partial(train_without_key, plain), variables)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        jax.eval_shape(functools.partial(train_without_key, dropped), variables)
    first, again, other = out["dropout"]
    np.testing.assert_array_equal(first, again)
    assert np.max(np.abs(first - other)) > 1e-3
    np.testing.assert_array_equal(out["dropout_eval"], out["together"])


@pytest.mark.slow
def test_published_mobilefacenet_runs_at_112_px():
    """The one full-size forward (0.44 GMACs an image): eval after a train step's stats."""
    model = mobilefacenet()

    def run(images):
        variables = model.init(jax.random.PRNGKey(0), images, train=False)
        trained, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return trained, model.apply({"params": variables["params"], **updates}, images,
                                    train=False)

    for out in _run_once(run, _images(4, 112, seed=2)):
        assert out.shape == (4, 512) and bool(jnp.all(jnp.isfinite(out)))
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_bfloat16_compute_gives_float32_unit_embeddings(name):
    f32 = SMALL[name]
    bf16 = f32.clone(dtype=jnp.bfloat16)
    images = _images(4, 32, seed=3)
    variables = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), images, train=False))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))

    def run(images):
        variables = bf16.init(jax.random.PRNGKey(0), images, train=False)
        return (f32.apply(variables, images, train=False),
                bf16.apply(variables, images, train=False))

    reference, out = _run_once(run, images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-6)
    assert 0.0 < float(jnp.max(jnp.abs(out - reference))) < 0.05  # bf16 ran, and stayed close
    jaxpr = jax.make_jaxpr(lambda v, x: bf16.apply(v, x, train=False))(variables, images)
    conv_dtypes = {eqn.invars[0].aval.dtype for eqn in jaxpr.jaxpr.eqns
                   if eqn.primitive.name == "conv_general_dilated"}
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name", SMALL)
def test_every_batch_norm_syncs_over_the_axis(name):
    """Traced under shard_map: one cross-device mean per BN layer in training, none in eval."""
    model = SMALL[name].clone(bn_axis_name="batch")
    images = jnp.zeros((NUM_DEVICES, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images[:1],
                                                  train=False))
    num_bn_layers = len(jax.tree.leaves(variables["batch_stats"])) // 2

    def traced(train):
        sharded = jax.shard_map(
            lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"])[0],
            mesh=_mesh(), in_specs=(P(), P("batch")), out_specs=P("batch"), check_vma=False)
        return jax.make_jaxpr(sharded)(variables, images)

    assert _count_primitive(traced(True).jaxpr, "psum") == num_bn_layers > 0
    assert _count_primitive(traced(False).jaxpr, "psum") == 0


@pytest.mark.parametrize("model, size, message", [
    (iresnet100(), 15, "iresnet100 needs images of at least 16x16 px, got 15x15"),
    (mobilefacenet(), 12, "mobilefacenet needs images of at least 16x16 px, got 12x12"),
    (IResNet(stage_sizes=(3, 4, 14)), 112, r"one entry per stage"),
    (mobilefacenet(stage_sizes=(1, 4, 6)), 112, "4 stage_sizes"),
    (mobilefacenet(stem_groups=48), 112, "stem_groups 48 must divide"),
])
def test_bad_input_or_fields_fail_before_compiling(model, size, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                          train=False))


def test_prelu_per_channel_slopes():
    x = jnp.array([[-2.0, -1.0, 0.0], [3.0, -4.0, 5.0]])
    layer = PReLU()
    variables = layer.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(variables["params"]["negative_slope"], [0.25] * 3)
    np.testing.assert_allclose(layer.apply(variables, x), [[-0.5, -0.25, 0], [3, -1, 5]])
    slopes = {"params": {"negative_slope": jnp.array([0.0, 1.0, 2.0])}}
    np.testing.assert_allclose(layer.apply(slopes, x), [[0, -1, 0], [3, -4, 5]])
    out = layer.apply(variables, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


# --- the same forward written with PyTorch's conventions (optional: needs torch) ---------------

def _torch_ops():
    """float64 PyTorch versions of the layers, fed our parameters (train-mode BatchNorm)."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional

    def tensor(array):
        return torch.from_numpy(np.asarray(array, np.float64))

    def conv(x, p, stride=1, groups=1, padding=None):
        kernel = tensor(p["kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
        padding = kernel.shape[-1] // 2 if padding is None else padding
        return functional.conv2d(x, kernel, stride=stride, padding=padding, groups=groups)

    def bn(x, p):
        scale = tensor(p["scale"]) if "scale" in p else None
        return functional.batch_norm(x, None, None, scale, tensor(p["bias"]), training=True,
                                     eps=1e-5)

    def prelu(x, p):
        return functional.prelu(x, tensor(p["negative_slope"]))

    def images_in(images):  # [N, H, W, 3] in [0, 1] -> NCHW in [-1, 1]
        return tensor(images).permute(0, 3, 1, 2) * 2 - 1

    def embed(x, head):  # flattened features -> linear -> BN -> unit rows
        x = bn(x @ tensor(head["embedding"]["kernel"]), head["embedding_bn"])
        return functional.normalize(x, dim=1).numpy()

    return conv, bn, prelu, images_in, embed


def _torch_iresnet(params, images, stage_sizes):
    """arcface_torch's IResNet.forward (train mode) on our parameters."""
    conv, bn, prelu, images_in, embed = _torch_ops()
    x = prelu(bn(conv(images_in(images), params["Conv_0"]), params["BatchNorm_0"]),
              params["PReLU_0"])
    blocks = iter(params[f"IBasicBlock_{i}"] for i in range(sum(stage_sizes)))
    for num_blocks in stage_sizes:
        for index in range(num_blocks):
            p, stride = next(blocks), 2 if index == 0 else 1
            y = prelu(bn(conv(bn(x, p["BatchNorm_0"]), p["Conv_0"]), p["BatchNorm_1"]),
                      p["PReLU_0"])
            y = bn(conv(y, p["Conv_1"], stride), p["BatchNorm_2"])
            if "Conv_2" in p:  # downsample
                x = bn(conv(x, p["Conv_2"], stride), p["BatchNorm_3"])
            x = y + x
    x = bn(x, params["BatchNorm_1"])
    # PyTorch flattens [C, H, W]; ours is [H, W, C]: this permutation converts the fc weights.
    n, c, h, w = x.shape
    head = dict(params["EmbeddingHead_0"])
    head["embedding"] = {"kernel": np.asarray(head["embedding"]["kernel"]).reshape(
        h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)}
    return embed(x.reshape(n, -1), head)


def _torch_mobilefacenet(params, images, stage_sizes, stem_groups):
    """arcface_torch's MobileFaceNet.forward (train mode, stage 0 a single conv)."""
    conv, bn, prelu, images_in, embed = _torch_ops()

    def unit(x, p, stride=1, groups=1, padding=None, activate=True):
        x = bn(conv(x, p["Conv_0"], stride, groups, padding), p["BatchNorm_0"])
        return prelu(x, p["PReLU_0"]) if activate else x

    def depthwise(x, p, stride):  # DepthWise(residual=stride == 1)
        y = unit(x, p["ConvUnit_0"])
        y = unit(y, p["ConvUnit_1"], stride, groups=y.shape[1])
        y = unit(y, p["ConvUnit_2"], activate=False)
        return y + x if stride == 1 else y

    x = unit(images_in(images), params["ConvUnit_0"], 2)
    x = unit(x, params["ConvUnit_1"], groups=stem_groups)
    blocks = iter(params[f"InvertedResidual_{i}"] for i in range(sum(stage_sizes) + 2))
    for count in stage_sizes[1:]:
        x = depthwise(x, next(blocks), 2)
        for _ in range(count):
            x = depthwise(x, next(blocks), 1)
    x = unit(x, params["ConvUnit_2"])
    x = unit(x, params["ConvUnit_3"], groups=x.shape[1], padding=0, activate=False)  # GDC
    return embed(x.reshape(x.shape[0], -1), params["EmbeddingHead_0"])


def test_forward_equals_pytorch_layout(small_forward):
    """Train mode, random parameters: our embeddings equal a float64 PyTorch forward in
    insightface's layout, which checks the padding of strided convs, the block order, groups,
    shortcuts, per-channel slopes and the flatten order."""
    name, images, out = small_forward
    model, params = SMALL[name], out["variables"]["params"]
    if name == "iresnet":
        reference = _torch_iresnet(params, images, model.stage_sizes)
    else:
        reference = _torch_mobilefacenet(params, images, model.stage_sizes, model.stem_groups)
    np.testing.assert_allclose(out["trained"], reference, rtol=0, atol=1e-4)
