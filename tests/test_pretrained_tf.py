"""davidsandberg/facenet's TensorFlow files in Flax: the imported model computes what TensorFlow
computes with the same file.

The fixtures are built here: davidsandberg's Inception-ResNet-v1 written in `tf.compat.v1` with
his node and variable names (src/models/inception_resnet_v1.py), random weights and BatchNorm
statistics, fewer block repeats and 80 px inputs; saved as a checkpoint (unfolded BatchNorms),
frozen, and passed through TensorFlow's own `optimize_for_inference` (folded BatchNorms, the
layout of the CASIA-WebFace model's graph_final.pb). The real file is checked too when present
(FACENET_CASIA_PB, default ~/.cache/facenet_jax/20180408-102900_graph_final.pb; fetched by
../shared/tools/get_facenet_casia.sh).
"""

from __future__ import annotations

import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facenet_jax import pretrained, pretrained_tf

tf = pytest.importorskip(
    "tensorflow", reason="TensorFlow is not installed: pip install '.[pretrained-tf]' to run "
    "the TensorFlow weight-import tests")

SIZE = 80  # the smallest input of our encoder is 75 px
REPEATS = (2, 1, 1)
CLASSES = 7  # the training classifier Logits/* a checkpoint of train_softmax.py holds
REAL_GRAPH = pathlib.Path(os.environ.get(
    "FACENET_CASIA_PB", pathlib.Path.home() / ".cache" / "facenet_jax"
    / "20180408-102900_graph_final.pb"))
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------------------------
# Face crops: a few real LFW photos (central crop) or, without the shared data, synthetic faces.


def face_crops(size: int, count: int = 4) -> np.ndarray:
    """uint8 [count, size, size, 3]: the central 130 px of LFW photos of two people, resized
    (a stand-in for an MTCNN box, no TensorFlow detector needed), else synthetic faces."""
    from PIL import Image

    folder = SHARED_DATA / "lfw_half"
    people = ("Abel_Pacheco", "Akhmed_Zakayev")
    paths = [p for person in people for p in sorted((folder / person).glob("*.jpg"))[:2]]
    if len(paths) < count:
        from facenet_jax.data.synthetic import load_synthetic

        return load_synthetic(2, (count + 1) // 2, size).images[:count]
    crops = []
    for path in paths[:count]:
        photo = Image.open(path).convert("RGB")
        left = (photo.width - 130) // 2
        top = (photo.height - 130) // 2
        crops.append(np.asarray(photo.crop((left, top, left + 130, top + 130)).resize(
            (size, size), Image.BILINEAR)))
    return np.stack(crops)


def standardised(images: np.ndarray) -> np.ndarray:
    """davidsandberg's fixed_image_standardization, what `input:0` expects."""
    return (images.astype(np.float32) - 127.5) / 128.0


def tf_graph_embeddings(graph_def, images: np.ndarray, *, one_at_a_time: bool = False
                        ) -> np.ndarray:
    """TensorFlow executing a frozen graph: input:0 -> embeddings:0."""
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            run = lambda x: session.run("embeddings:0", {"input:0": standardised(x)})
            if one_at_a_time:
                return np.concatenate([run(image[None]) for image in images])
            return run(images)


def our_embeddings(variables, repeats, images: np.ndarray) -> np.ndarray:
    model = pretrained.build_model(block35_repeats=repeats[0], block17_repeats=repeats[1],
                                   block8_repeats=repeats[2], bn_scale=False)
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, images.astype(np.float32) / 255.0))


# ----------------------------------------------------------------------------------------------
# davidsandberg's Inception-ResNet-v1 in tf.compat.v1 with his names.

BLOCK35 = [[("Conv2d_1x1", 32, 1)],
           [("Conv2d_0a_1x1", 32, 1), ("Conv2d_0b_3x3", 32, 3)],
           [("Conv2d_0a_1x1", 32, 1), ("Conv2d_0b_3x3", 32, 3), ("Conv2d_0c_3x3", 32, 3)]]
BLOCK17 = [[("Conv2d_1x1", 128, 1)],
           [("Conv2d_0a_1x1", 128, 1), ("Conv2d_0b_1x7", 128, (1, 7)),
            ("Conv2d_0c_7x1", 128, (7, 1))]]
BLOCK8 = [[("Conv2d_1x1", 192, 1)],
          [("Conv2d_0a_1x1", 192, 1), ("Conv2d_0b_1x3", 192, (1, 3)),
           ("Conv2d_0c_3x1", 192, (3, 1))]]


def build_tf_model(rng: np.random.Generator, repeats: tuple[int, int, int]):
    """In the default graph: input (placeholder [None, SIZE, SIZE, 3]) -> embeddings, with
    random weights, BN offsets and moving statistics, slim's layout (scale=False, eps 1e-3).
    Returns (the bottleneck's pre-BN output, its BN moving mean and variance variables)."""
    v1 = tf.compat.v1

    def variable(name, value):
        return v1.get_variable(name, initializer=np.asarray(value, np.float32),
                               use_resource=False)

    def conv(net, filters, kernel, scope, stride=1, padding="SAME", bn=True):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        fan_in = kh * kw * int(net.shape[-1])
        with v1.variable_scope(scope):
            weights = variable("weights", rng.normal(0, np.sqrt(2.0 / fan_in),
                                                     (kh, kw, int(net.shape[-1]), filters)))
            y = tf.nn.conv2d(net, weights, strides=[1, stride, stride, 1], padding=padding)
            if not bn:
                return tf.nn.bias_add(y, variable("biases", rng.normal(0, 0.1, filters)))
            with v1.variable_scope("BatchNorm"):
                beta = variable("beta", rng.normal(0, 0.2, filters))
                mean = variable("moving_mean", rng.normal(0, 0.2, filters))
                var = variable("moving_variance", rng.uniform(0.5, 1.5, filters))
                y, _, _ = v1.nn.fused_batch_norm(y, tf.ones([filters]), beta, mean, var,
                                                 epsilon=1e-3, is_training=False)
            return tf.nn.relu(y)

    def block(net, scope, branches, scale, activate=True):
        with v1.variable_scope(scope):
            outputs = []
            for b, layers in enumerate(branches):
                with v1.variable_scope(f"Branch_{b}"):
                    y = net
                    for name, filters, kernel in layers:
                        y = conv(y, filters, kernel, name)
                outputs.append(y)
            up = conv(tf.concat(outputs, 3), int(net.shape[-1]), 1, "Conv2d_1x1", bn=False)
            net = net + scale * up
            return tf.nn.relu(net) if activate else net

    def max_pool(net, name):
        return tf.nn.max_pool2d(net, 3, 2, "VALID", name=name)

    images = v1.placeholder(tf.float32, [None, SIZE, SIZE, 3], name="input")
    with v1.variable_scope("InceptionResnetV1"):
        net = conv(images, 32, 3, "Conv2d_1a_3x3", 2, "VALID")
        net = conv(net, 32, 3, "Conv2d_2a_3x3", 1, "VALID")
        net = conv(net, 64, 3, "Conv2d_2b_3x3")
        net = max_pool(net, "MaxPool_3a_3x3")
        net = conv(net, 80, 1, "Conv2d_3b_1x1", 1, "VALID")
        net = conv(net, 192, 3, "Conv2d_4a_3x3", 1, "VALID")
        net = conv(net, 256, 3, "Conv2d_4b_3x3", 2, "VALID")
        with v1.variable_scope("Repeat"):
            for i in range(repeats[0]):
                net = block(net, f"block35_{i + 1}", BLOCK35, 0.17)
        with v1.variable_scope("Mixed_6a"):
            with v1.variable_scope("Branch_0"):
                b0 = conv(net, 384, 3, "Conv2d_1a_3x3", 2, "VALID")
            with v1.variable_scope("Branch_1"):
                b1 = conv(conv(conv(net, 192, 1, "Conv2d_0a_1x1"), 192, 3, "Conv2d_0b_3x3"),
                          256, 3, "Conv2d_1a_3x3", 2, "VALID")
            with v1.variable_scope("Branch_2"):
                b2 = max_pool(net, "MaxPool_1a_3x3")
            net = tf.concat([b0, b1, b2], 3)
        with v1.variable_scope("Repeat_1"):
            for i in range(repeats[1]):
                net = block(net, f"block17_{i + 1}", BLOCK17, 0.10)
        with v1.variable_scope("Mixed_7a"):
            with v1.variable_scope("Branch_0"):
                b0 = conv(conv(net, 256, 1, "Conv2d_0a_1x1"), 384, 3, "Conv2d_1a_3x3", 2,
                          "VALID")
            with v1.variable_scope("Branch_1"):
                b1 = conv(conv(net, 256, 1, "Conv2d_0a_1x1"), 256, 3, "Conv2d_1a_3x3", 2,
                          "VALID")
            with v1.variable_scope("Branch_2"):
                b2 = conv(conv(conv(net, 256, 1, "Conv2d_0a_1x1"), 256, 3, "Conv2d_0b_3x3"),
                          256, 3, "Conv2d_1a_3x3", 2, "VALID")
            with v1.variable_scope("Branch_3"):
                b3 = max_pool(net, "MaxPool_1a_3x3")
            net = tf.concat([b0, b1, b2, b3], 3)
        with v1.variable_scope("Repeat_2"):
            for i in range(repeats[2]):
                net = block(net, f"block8_{i + 1}", BLOCK8, 0.20)
        net = block(net, "Block8", BLOCK8, 1.0, activate=False)
        with v1.variable_scope("Logits"):
            net = tf.reshape(tf.reduce_mean(net, axis=[1, 2]), [-1, 1792])
        with v1.variable_scope("Bottleneck"):
            features = tf.matmul(net, variable("weights", rng.normal(0, 0.03, (1792, 512))))
            with v1.variable_scope("BatchNorm"):
                mean = variable("moving_mean", np.zeros(512))
                var = variable("moving_variance", np.ones(512))
                y, _, _ = v1.nn.fused_batch_norm(
                    tf.reshape(features, [-1, 1, 1, 512]), tf.ones([512]),
                    variable("beta", rng.normal(0, 0.2, 512)), mean, var, epsilon=1e-3,
                    is_training=False)
            y = tf.reshape(y, [-1, 512])
    with v1.variable_scope("Logits"):  # train_softmax.py's classifier, outside the encoder
        variable("weights", rng.normal(0, 0.1, (512, CLASSES)))
        variable("biases", np.zeros(CLASSES))
    tf.nn.l2_normalize(y, 1, 1e-10, name="embeddings")
    return features, mean, var


@pytest.fixture(scope="module")
def tf_files(tmp_path_factory):
    """(folder, checkpoint prefix, unfolded frozen graph path, folded graph path, crops,
    TF's embeddings of the crops by the checkpoint's graph)."""
    from tensorflow.python.tools import optimize_for_inference_lib

    folder = tmp_path_factory.mktemp("facenet_tf")
    crops = face_crops(SIZE)
    rng = np.random.default_rng(0)
    with tf.Graph().as_default() as graph:
        features, mean, var = build_tf_model(rng, REPEATS)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            # At random initialisation the bottleneck barely varies across images: centre its
            # BN on these images (times random factors) so the embeddings differ at O(1).
            values = session.run(features, {"input:0": standardised(crops)})
            session.run([mean.assign(values.mean(0) + rng.normal(0, 0.1, 512)
                                     * values.std(0)),
                         var.assign(values.var(0) * rng.uniform(0.5, 1.5, 512))])
            expected = session.run("embeddings:0", {"input:0": standardised(crops)})
            prefix = tf.compat.v1.train.Saver().save(
                session, str(folder / "model-20180408-102900.ckpt"), global_step=90)
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), ["embeddings"])
    folded = optimize_for_inference_lib.optimize_for_inference(
        frozen, ["input"], ["embeddings"], tf.float32.as_datatype_enum)
    unfolded_path, folded_path = folder / "frozen.pb", folder / "graph_final.pb"
    unfolded_path.write_bytes(frozen.SerializeToString())
    folded_path.write_bytes(folded.SerializeToString())
    return folder, prefix, unfolded_path, folded_path, crops, expected


# ----------------------------------------------------------------------------------------------
# Without TensorFlow's execution.


def test_identity_batch_norm_adds_the_offset_bit_for_bit():
    """The folded layout's BN: mean 0, variance IDENTITY_VARIANCE, eps 1e-3 -> x + offset."""
    assert np.float32(pretrained_tf.IDENTITY_VARIANCE) + np.float32(1e-3) == np.float32(1.0)
    x = np.random.default_rng(1).normal(0, 3, (2, 5, 5, 6)).astype(np.float32)
    offset = np.random.default_rng(2).normal(0, 1, 6).astype(np.float32)
    bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3, use_scale=False)
    variables = {"params": {"bias": offset},
                 "batch_stats": {"mean": np.zeros(6, np.float32),
                                 "var": np.full(6, pretrained_tf.IDENTITY_VARIANCE)}}
    got = np.asarray(jax.jit(bn.apply)(variables, jnp.asarray(x)))
    np.testing.assert_array_equal(got, x + offset)
    # The plain 1 - eps in float64 would not: (var + eps) rounds away from 1.
    variables["batch_stats"]["var"] = np.full(6, 1.0 - 1e-3 + 1e-6, np.float32)
    assert not np.array_equal(np.asarray(jax.jit(bn.apply)(variables, jnp.asarray(x))),
                              x + offset)


def test_tf_layer_names_cover_the_full_model_once():
    """Every TF scope of the full model maps to one of our module paths, none twice, in the
    same count as facenet-pytorch's mapping."""
    tf_layers = list(pretrained.layer_names(5, 10, 5, pretrained_tf.FACENET_TF_NAMES))
    torch_layers = list(pretrained.layer_names(5, 10, 5))
    assert [p for _, _, p in tf_layers] == [p for _, _, p in torch_layers]
    assert len({n for n, _, _ in tf_layers}) == len(tf_layers) == 132 + 2
    names = {n for n, _, _ in tf_layers}
    for name in ("InceptionResnetV1/Repeat_1/block17_10/Branch_1/Conv2d_0c_7x1",
                 "InceptionResnetV1/Mixed_7a/Branch_2/Conv2d_0b_3x3",
                 "InceptionResnetV1/Block8/Conv2d_1x1", "InceptionResnetV1/Bottleneck"):
        assert name in names


# ----------------------------------------------------------------------------------------------
# Against TensorFlow's execution of the same files.


@pytest.mark.slow
def test_folded_graph_and_checkpoint_match_tensorflow(tf_files):
    folder, prefix, unfolded_path, folded_path, crops, expected = tf_files
    # TensorFlow's own folding did fold: the conv BNs are gone, the bottleneck's stays.
    folded_def = tf.compat.v1.GraphDef.FromString(folded_path.read_bytes())
    ops = [node.op for node in folded_def.node]
    assert ops.count("FusedBatchNormV3") + ops.count("FusedBatchNorm") == 1
    assert any(node.name.endswith("/Conv2D_bn_offset") for node in folded_def.node)
    folded_tf = tf_graph_embeddings(folded_def, crops)
    assert np.abs(folded_tf - expected).max() < 1e-5  # folding itself is exact to float32
    distances = ((expected[:, None] - expected[None]) ** 2).sum(-1)
    assert distances[np.triu_indices(len(crops), 1)].min() > 0.01  # the test can fail

    graph = pretrained_tf.read_facenet_tf(folded_path)
    variables, details = pretrained_tf.convert_facenet_tf(
        graph.arrays, residual_scales=graph.residual_scales)
    assert details == {"bn_layout": "folded", "repeats": list(REPEATS), "ignored_keys": [],
                       "logits_classes": None}
    assert graph.input_shape == (None, SIZE, SIZE, 3)
    assert len(graph.residual_scales) == sum(REPEATS) + 1
    got = our_embeddings(variables, REPEATS, crops)
    assert np.abs(got - folded_tf).max() <= TOLERANCE

    # The checkpoint: unfolded BNs, the classifier ignored; a prefix or its .index file.
    for weights in (prefix, prefix + ".index"):
        checkpoint = pretrained_tf.read_facenet_tf(weights)
        ckpt_variables, details = pretrained_tf.convert_facenet_tf(checkpoint.arrays)
        assert details == {"bn_layout": "unfolded", "repeats": list(REPEATS),
                           "ignored_keys": ["Logits/biases", "Logits/weights"],
                           "logits_classes": CLASSES}
    got = our_embeddings(ckpt_variables, REPEATS, crops)
    assert np.abs(got - expected).max() <= TOLERANCE
    # The frozen graph before folding holds the checkpoint's variables: same conversion.
    unfolded = pretrained_tf.read_facenet_tf(unfolded_path)
    from_graph, details = pretrained_tf.convert_facenet_tf(unfolded.arrays)
    assert details["bn_layout"] == "unfolded"
    jax.tree.map(np.testing.assert_array_equal, from_graph, ckpt_variables)

    # A plausible slip inside (one block17 BN's mean and variance swapped) breaks parity.
    stats = ckpt_variables["batch_stats"]["InceptionResidual_2"]["ConvBN_2"]["BatchNorm_0"]
    stats["mean"], stats["var"] = stats["var"], np.abs(stats["mean"]) + 0.5
    assert np.abs(our_embeddings(ckpt_variables, REPEATS, crops) - expected).max() > 1e-3


@pytest.mark.slow
def test_older_tensorflow_folding_names_convert_the_same(tf_files):
    """TensorFlow 1.x's optimize_for_inference kept each folded kernel under `<conv>/weights`
    (as in the real file); newer versions add `<conv>/Conv2D_weights`: both read alike. A
    BatchNorm of another epsilon is refused."""
    folded_path = tf_files[3]
    graph_def = tf.compat.v1.GraphDef.FromString(folded_path.read_bytes())
    renamed = 0
    for node in graph_def.node:
        if node.name.endswith("/Conv2D_weights"):
            node.name = node.name.removesuffix("Conv2D_weights") + "weights"
            renamed += 1
        for i, name in enumerate(node.input):
            if name.endswith("/Conv2D_weights"):
                node.input[i] = name.removesuffix("Conv2D_weights") + "weights"
    assert renamed > 0
    old = folded_path.with_name("old_names.pb")
    old.write_bytes(graph_def.SerializeToString())
    new, _ = pretrained_tf.convert_facenet_tf(pretrained_tf.read_facenet_tf(folded_path).arrays)
    renamed_variables, _ = pretrained_tf.convert_facenet_tf(
        pretrained_tf.read_facenet_tf(old).arrays)
    jax.tree.map(np.testing.assert_array_equal, renamed_variables, new)

    # The kept bottleneck BatchNorm must be slim's: epsilon 1e-3, scale 1.
    for node in graph_def.node:
        if node.op.startswith("FusedBatchNorm"):
            node.attr["epsilon"].f = 1e-5
    old.write_bytes(graph_def.SerializeToString())
    with pytest.raises(ValueError, match=r"Bottleneck/BatchNorm/\S+ has epsilon 1e-05, "
                       "expected 0.001"):
        pretrained_tf.read_facenet_tf(old)


@pytest.mark.slow
def test_import_writes_a_run_with_provenance_that_embeds_like_tensorflow(tf_files, tmp_path):
    from facenet_jax.eval import embed

    folder, prefix, _, folded_path, crops, expected = tf_files
    info = pretrained.import_weights(folded_path, tmp_path / "graph_run", source="facenet-tf")
    record = json.loads((tmp_path / "graph_run" / "config.json").read_text())
    imported = record["provenance"]["imported"]
    assert imported["sha256"] == pretrained.sha256(folded_path) == info["sha256"]
    assert imported["bn_layout"] == "folded" and imported["format"] == "frozen graph"
    model = record["config"]["model"]
    assert model["bn_scale"] is False and model["input_norm"] == "fixed_standardization"
    assert record["config"]["data"]["image_size"] == SIZE  # the graph's input placeholder
    assert [model["inception_resnet_v1"][f"{s}_repeats"] for s in pretrained_tf.STAGES] == \
        list(REPEATS)
    encoder = embed.load_encoder(tmp_path / "graph_run", flip=False)
    folded_tf = tf_graph_embeddings(tf.compat.v1.GraphDef.FromString(folded_path.read_bytes()),
                                    crops)
    assert np.abs(encoder.embed(crops) - folded_tf).max() <= TOLERANCE

    info = pretrained.import_weights(prefix, tmp_path / "ckpt_run", source="facenet-tf")
    data_file = pathlib.Path(prefix + ".data-00000-of-00001")
    assert info["bn_layout"] == "unfolded" and info["format"] == "checkpoint"
    assert info["sha256"] == pretrained.sha256(data_file)
    assert set(info["files"]) == {data_file.name, pathlib.Path(prefix + ".index").name}
    assert info["logits_classes"] == CLASSES and info["input_shape"] is None
    # A checkpoint says nothing of the image size: FaceNet's 160 px; the run restores exactly
    # the converted variables (whose embeddings the checkpoint test compares with TensorFlow).
    encoder = embed.load_encoder(tmp_path / "ckpt_run", flip=False)
    assert encoder.config.data.image_size == pretrained.IMAGE_SIZE
    converted, _ = pretrained_tf.convert_facenet_tf(pretrained_tf.read_facenet_tf(prefix).arrays)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, dict(encoder.variables)), converted)


def test_bad_files_are_named(tmp_path):
    not_a_graph = tmp_path / "noise.pb"
    not_a_graph.write_bytes(b"\xff\x00 not a protobuf \x12\x99")
    with pytest.raises(ValueError, match="not a TensorFlow GraphDef"):
        pretrained_tf.read_facenet_tf(not_a_graph)
    with pytest.raises(FileNotFoundError, match="nope.pb does not exist"):
        pretrained_tf.read_facenet_tf(tmp_path / "nope.pb")
    with pytest.raises(FileNotFoundError, match=r"no TensorFlow checkpoint at .*model.ckpt-3 "
                       r"\(expected model.ckpt-3.index"):
        pretrained_tf.read_facenet_tf(tmp_path / "model.ckpt-3")
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint in"):
        pretrained_tf.read_facenet_tf(tmp_path)
    with pytest.raises(ValueError, match="no conv BatchNorm under InceptionResnetV1/"):
        pretrained_tf.convert_facenet_tf({"resnet/conv1/weights": np.zeros((3, 3, 3, 8))})


@pytest.mark.slow
def test_conversion_names_every_bad_array(tf_files):
    arrays = pretrained_tf.read_facenet_tf(tf_files[1]).arrays
    broken = dict(arrays)
    del broken["InceptionResnetV1/Repeat_1/block17_1/Branch_1/Conv2d_0b_1x7/weights"]
    broken["InceptionResnetV1/Extra/weights"] = np.zeros(3, np.float32)
    broken["InceptionResnetV1/Bottleneck/BatchNorm/moving_variance"] = np.ones((2, 256))
    with pytest.raises(ValueError) as error:
        pretrained_tf.convert_facenet_tf(broken)
    for part in ("missing InceptionResnetV1/Repeat_1/block17_1/Branch_1/Conv2d_0b_1x7/weights",
                 "unexpected InceptionResnetV1/Extra/weights",
                 "Bottleneck/BatchNorm/moving_variance has shape (2, 256)"):
        assert part in str(error.value)
    gaps = {k.replace("block35_2", "block35_3"): v for k, v in arrays.items()}
    with pytest.raises(ValueError, match=r"block35 blocks are numbered \[1, 3\]"):
        pretrained_tf.convert_facenet_tf(gaps)
    both = {**arrays, "InceptionResnetV1/Conv2d_1a_3x3/Conv2D_bn_offset": np.zeros(32)}
    with pytest.raises(ValueError, match="both folded"):
        pretrained_tf.convert_facenet_tf(both)
    scales = {"InceptionResnetV1/Repeat/block35_1": 0.17, "InceptionResnetV1/Block8": 0.2}
    with pytest.raises(ValueError, match="Block8 scales its residual by 0.2, expected 1"):
        pretrained_tf.convert_facenet_tf(arrays, residual_scales=scales)
    wide = dict(arrays)
    wide["InceptionResnetV1/Conv2d_2b_3x3/weights"] = np.zeros((5, 5, 32, 64), np.float32)
    with pytest.raises(ValueError, match=r"ConvBN_2/Conv_0/kernel: shape \(5, 5, 32, 64\)"):
        pretrained_tf.convert_facenet_tf(wide)


# ----------------------------------------------------------------------------------------------
# The real file.


@pytest.mark.slow
def test_real_casia_graph_matches_tensorflow_on_real_faces():
    """davidsandberg's CASIA-WebFace model 20180408-102900 (folded graph, batch 1 inputs):
    our import embeds 160 px face crops as TensorFlow does, to 1e-5."""
    if not REAL_GRAPH.is_file():
        pytest.skip(f"{REAL_GRAPH} is absent (../shared/tools/get_facenet_casia.sh fetches it; "
                    "FACENET_CASIA_PB names another path)")
    crops = face_crops(pretrained.IMAGE_SIZE)
    graph = pretrained_tf.read_facenet_tf(REAL_GRAPH)
    variables, details = pretrained_tf.convert_facenet_tf(
        graph.arrays, residual_scales=graph.residual_scales)
    assert details["bn_layout"] == "folded" and details["repeats"] == [5, 10, 5]
    expected = tf_graph_embeddings(tf.compat.v1.GraphDef.FromString(REAL_GRAPH.read_bytes()),
                                   crops, one_at_a_time=True)
    got = our_embeddings(variables, (5, 10, 5), crops)
    difference = np.abs(got - expected).max()
    print(f"real graph: max |ours - TensorFlow| = {difference:.2e} over {len(crops)} crops")
    assert difference <= TOLERANCE
