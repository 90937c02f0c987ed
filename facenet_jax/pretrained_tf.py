"""davidsandberg/facenet's own TensorFlow files in Flax: frozen graphs (.pb) and checkpoints.

    python -m facenet_jax.pretrained --source facenet-tf --weights FILE.pb --workdir DIR
    python -m facenet_jax.pretrained --source facenet-tf --weights model-DATE.ckpt-N --workdir DIR

Their Inception-ResNet-v1 (`src/models/inception_resnet_v1.py`, TF-slim, scope
`InceptionResnetV1`) is our `inception_resnet_v1` with its default `bn_scale=False`: every conv
is followed by a BatchNorm with an offset and no scale (slim's default; epsilon 1e-3), the
residual up-projections have a bias, the bottleneck (1792 -> 512) has none and a BatchNorm. The
block repeats are read from the names (`Repeat/block35_1`, ...), so reduced models import too.
A file holds one of two BatchNorm layouts:

- "unfolded": a checkpoint (`<conv>/BatchNorm/beta`, `moving_mean`, `moving_variance`), or a
  graph frozen with those constants (davidsandberg's `freeze_graph.py`): mapped one to one.
- "folded": a graph passed through TensorFlow's `optimize_for_inference` (such as the
  CASIA-WebFace model 20180408-102900's `graph_final.pb`): each conv's BatchNorm is folded into
  it, weights × 1/sqrt(var + eps) and a bias `<conv>/Conv2D_bn_offset` = beta − mean/sqrt(var +
  eps); the bottleneck's BatchNorm is kept. Our BatchNorm then carries the offset as an
  identity: mean 0 and variance `IDENTITY_VARIANCE` (float32(1 − eps) + eps is exactly 1.0 in
  float32, so it computes x + offset bit for bit). Evaluated, the model computes what the graph
  does. Fine-tuned in training mode, a folded conv is normalised by batch statistics (its scale
  cancels) and shifted by the offset, not by the unfolded beta: another start than the
  checkpoint's.

The run's provenance records the file's SHA-256 (a checkpoint's: of its data file; every file
read is in `files`) and `bn_layout`. Reading needs TensorFlow, an optional extra imported only
here: `pip install 'facenet_jax[pretrained-tf]'`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from facenet_jax import pretrained_common

TF_HINT = ("reading davidsandberg's TensorFlow files needs TensorFlow, an optional extra: "
           "pip install 'facenet_jax[pretrained-tf]'")
SOURCE = "facenet-tf"
SCOPE = "InceptionResnetV1"
BN_EPSILON = 1e-3
LAYOUTS = ("folded", "unfolded")
STAGES = ("block35", "block17", "block8")
# net += scale * up in each stage's blocks; the last block8 is unscaled and has no ReLU.
RESIDUAL_SCALES = {"block35": 0.17, "block17": 0.10, "block8": 0.20}
LAST_BLOCK_SCALE = 1.0
# float32(1 - eps): float32(var + eps) is exactly 1.0, so 1/sqrt(var + eps) is 1 (tested).
IDENTITY_VARIANCE = np.float32(1.0) - np.float32(BN_EPSILON)
# The last name part of the file's parameters; others (slim's BN ones-constant, shapes, axes,
# optimizer slots, global_step) are not parameters of the encoder.
PARAMETER_NAMES = ("weights", "biases", "beta", "gamma", "moving_mean", "moving_variance",
                   "Conv2D_bn_offset")
_SLIM_REPEAT_SCOPES = {"block35": "Repeat", "block17": "Repeat_1", "block8": "Repeat_2"}
_BLOCK17 = ("Branch_0/Conv2d_1x1", "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_1x7",
            "Branch_1/Conv2d_0c_7x1")
_BLOCK8 = ("Branch_0/Conv2d_1x1", "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_1x3",
           "Branch_1/Conv2d_0c_3x1")
# davidsandberg's names, full model (slim.repeat numbers blocks from 1 in Repeat, Repeat_1,
# Repeat_2); `convert_facenet_tf` replaces `repeat` with the scopes found in the file.
FACENET_TF_NAMES = pretrained_common.LayerNames(
    stem=tuple(f"{SCOPE}/{name}" for name in (
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "Conv2d_4b_3x3")),
    block35=("Branch_0/Conv2d_1x1", "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_3x3",
             "Branch_2/Conv2d_0a_1x1", "Branch_2/Conv2d_0b_3x3", "Branch_2/Conv2d_0c_3x3"),
    block17=_BLOCK17, block8=_BLOCK8,
    mixed_6a=tuple(f"{SCOPE}/Mixed_6a/{name}" for name in (
        "Branch_0/Conv2d_1a_3x3", "Branch_1/Conv2d_1a_3x3", "Branch_1/Conv2d_0b_3x3",
        "Branch_1/Conv2d_0a_1x1")),
    mixed_7a=tuple(f"{SCOPE}/Mixed_7a/{name}" for name in (
        "Branch_0/Conv2d_1a_3x3", "Branch_0/Conv2d_0a_1x1", "Branch_1/Conv2d_1a_3x3",
        "Branch_1/Conv2d_0a_1x1", "Branch_2/Conv2d_1a_3x3", "Branch_2/Conv2d_0b_3x3",
        "Branch_2/Conv2d_0a_1x1")),
    repeat=lambda stage, i: f"{SCOPE}/{_SLIM_REPEAT_SCOPES[stage]}/{stage}_{i + 1}",
    last_block=f"{SCOPE}/Block8", up="Conv2d_1x1", bottleneck=f"{SCOPE}/Bottleneck",
    last_bn=f"{SCOPE}/Bottleneck/BatchNorm", join="/")
_BLOCK_SCOPE = re.compile(rf"^{SCOPE}/(Repeat(?:_\d+)?)/({'|'.join(STAGES)})_(\d+)/")
_DATA_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")


@dataclasses.dataclass(frozen=True)
class TFWeights:
    """What a davidsandberg file holds: `arrays` by TF name (a graph's constants, with each
    conv's and the bottleneck's weights also under `<scope>/weights`), `kind` ("frozen graph" or
    "checkpoint"), `files` read (the main one first), a graph's residual scales {block scope:
    scale} and input shape (None for a checkpoint)."""

    arrays: dict[str, np.ndarray]
    kind: str
    files: tuple[pathlib.Path, ...]
    residual_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    input_shape: tuple[int | None, ...] | None = None


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(TF_HINT) from error
    return tf


def _node_name(tensor: str) -> str:
    """A GraphDef input ("^ctrl", "name:1") -> the node's name."""
    return tensor.lstrip("^").split(":")[0]


def read_frozen_graph(path: str | pathlib.Path) -> TFWeights:
    """A frozen GraphDef (.pb) -> TFWeights. Parsing runs no graph code; ValueError for a file
    that is not a GraphDef or whose BatchNorms use another epsilon than 1e-3."""
    tf = _tensorflow()
    from google.protobuf.message import DecodeError  # protobuf comes with TensorFlow

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    graph = tf.compat.v1.GraphDef()
    try:
        graph.ParseFromString(path.read_bytes())
    except DecodeError as error:
        raise ValueError(f"{path} is not a TensorFlow GraphDef (.pb): {error}") from error
    nodes = {node.name: node for node in graph.node}
    arrays = {node.name: tf.make_ndarray(node.attr["value"].tensor)
              for node in graph.node if node.op == "Const"}

    def source(tensor: str) -> str:
        """The node feeding `tensor`, through Identity nodes (frozen variables' reads)."""
        name = _node_name(tensor)
        while name in nodes and nodes[name].op == "Identity":
            name = _node_name(nodes[name].input[0])
        return name

    scales, problems = {}, []
    for node in graph.node:
        scope, _, op_name = node.name.rpartition("/")
        if node.op in ("Conv2D", "MatMul") and op_name in ("Conv2D", "MatMul"):
            # optimize_for_inference names a folded kernel `<scope>/Conv2D_weights` (newer
            # TensorFlow) or keeps `<scope>/weights` (older): read it from the conv's input.
            weights = source(node.input[1])
            if weights in arrays:
                arrays[f"{scope}/weights"] = arrays[weights]
        elif node.op == "Mul" and op_name == "mul" and (
                _BLOCK_SCOPE.match(node.name) or scope == FACENET_TF_NAMES.last_block):
            values = [arrays[source(i)] for i in node.input if source(i) in arrays]
            if len(values) == 1 and values[0].size == 1:
                scales[scope] = float(values[0])
        elif node.op.startswith("FusedBatchNorm"):
            epsilon = node.attr["epsilon"].f
            if not np.isclose(epsilon, BN_EPSILON, rtol=1e-6):
                problems.append(f"{node.name} has epsilon {epsilon:g}, expected {BN_EPSILON:g}")
            gamma = arrays.get(source(node.input[1]))
            if gamma is not None and not np.all(gamma == 1):
                problems.append(f"{node.name} has a scale (gamma) other than 1")
    if problems:
        raise ValueError(f"{path} is not davidsandberg's Inception-ResNet-v1 layout: "
                         + "; ".join(problems[:5]))
    placeholder = nodes.get("input")
    shape = None
    if placeholder is not None and placeholder.op == "Placeholder":
        dims = placeholder.attr["shape"].shape.dim
        shape = tuple(d.size if d.size >= 0 else None for d in dims) or None
    return TFWeights(arrays, "frozen graph", (path,), scales, shape)


def checkpoint_files(path: str | pathlib.Path) -> tuple[str, tuple[pathlib.Path, ...]]:
    """A checkpoint named by its prefix (`model-DATE.ckpt-N`), by one of its files (`.index`,
    `.meta`, `.data-*`) or by its folder (the newest one) -> (prefix, files read: data shards,
    then the index). FileNotFoundError naming what was looked for."""
    tf = _tensorflow()
    path = pathlib.Path(path)
    if path.is_dir():
        latest = tf.train.latest_checkpoint(str(path))
        if latest is None:
            raise FileNotFoundError(f"no TensorFlow checkpoint in {path} (no 'checkpoint' file "
                                    "naming one); pass the prefix model-DATE.ckpt-N")
        path = pathlib.Path(latest)
    name = _DATA_SHARD.sub("", path.name)
    for suffix in (".index", ".meta"):
        name = name.removesuffix(suffix)
    prefix = path.with_name(name)
    index = prefix.with_name(prefix.name + ".index")
    shards = tuple(sorted(prefix.parent.glob(prefix.name + ".data-*")))
    if not index.is_file() or not shards:
        raise FileNotFoundError(
            f"no TensorFlow checkpoint at {prefix} (expected {index.name} and "
            f"{prefix.name}.data-00000-of-00001 beside it); --weights takes the prefix "
            "model-DATE.ckpt-N or a .pb frozen graph")
    return str(prefix), shards + (index,)


def read_checkpoint(path: str | pathlib.Path) -> TFWeights:
    """A TF checkpoint (see `checkpoint_files`) -> TFWeights with every saved variable."""
    tf = _tensorflow()
    prefix, files = checkpoint_files(path)
    reader = tf.train.load_checkpoint(prefix)
    arrays = {name: np.asarray(reader.get_tensor(name))
              for name in reader.get_variable_to_shape_map()}
    return TFWeights(arrays, "checkpoint", files)


def read_facenet_tf(path: str | pathlib.Path) -> TFWeights:
    """A `.pb` frozen graph, otherwise a checkpoint."""
    if pathlib.Path(path).suffix == ".pb":
        return read_frozen_graph(path)
    return read_checkpoint(path)


def bn_layout(arrays: Mapping[str, np.ndarray]) -> str:
    """"folded" (the convs carry `Conv2D_bn_offset`) or "unfolded" (their BatchNorm
    variables); ValueError for both or neither."""
    convs = [k for k in arrays if k.startswith(f"{SCOPE}/")
             and not k.startswith(f"{FACENET_TF_NAMES.bottleneck}/")]
    folded = any(k.endswith("/Conv2D_bn_offset") for k in convs)
    unfolded = any(k.endswith("/BatchNorm/moving_mean") for k in convs)
    if folded == unfolded:
        raise ValueError(
            "not davidsandberg's Inception-ResNet-v1: "
            + ("both folded (Conv2D_bn_offset) and unfolded (BatchNorm/moving_mean) conv "
               "BatchNorms" if folded else
               f"no conv BatchNorm under {SCOPE}/ (neither <conv>/Conv2D_bn_offset nor "
               "<conv>/BatchNorm/moving_mean)"))
    return "folded" if folded else "unfolded"


def block_scopes(arrays: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """{stage: [scope of its 1st, 2nd, ... block]} from the names (`Repeat/block35_1`, ...);
    ValueError when a stage's numbers are not 1..n under one scope."""
    found: dict[str, dict[int, set[str]]] = {stage: {} for stage in STAGES}
    for key in arrays:
        match = _BLOCK_SCOPE.match(key)
        if match:
            repeat, stage, number = match.groups()
            found[stage].setdefault(int(number), set()).add(f"{SCOPE}/{repeat}/{stage}_{number}")
    scopes = {}
    for stage, blocks in found.items():
        if sorted(blocks) != list(range(1, len(blocks) + 1)) or any(
                len(s) > 1 for s in blocks.values()):
            raise ValueError(f"the {stage} blocks are numbered {sorted(blocks)} under "
                             f"{sorted(set().union(*blocks.values()))}; expected 1..n in one "
                             "Repeat scope")
        scopes[stage] = [blocks[number].pop() for number in sorted(blocks)]
    return scopes


def convert_facenet_tf(arrays: Mapping[str, Any], *,
                       residual_scales: Mapping[str, float] | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """davidsandberg's Inception-ResNet-v1 arrays by TF name -> (our variables, details).

    variables: {"params", "batch_stats"} of `inception_resnet_v1` with bn_scale=False,
    embedding_dim=512 and the file's block repeats, float32 numpy (TF's kernels are already
    [kh, kw, in, out] and [in, out]). details: {"bn_layout", "repeats" [block35, block17,
    block8], "ignored_keys" (parameters outside the encoder, e.g. the training classifier
    Logits/*), "logits_classes"}. `residual_scales` {block scope: scale} (a graph's) are
    checked against 0.17 / 0.10 / 0.20 / 1.0. ValueError naming every missing, unexpected or
    wrong-shaped array.
    """
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()
              if np.asarray(v).dtype.kind == "f"}
    layout = bn_layout(arrays)
    scopes = block_scopes(arrays)
    repeats = tuple(len(scopes[stage]) for stage in STAGES)
    names = dataclasses.replace(FACENET_TF_NAMES, repeat=lambda stage, i: scopes[stage][i])
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    reader = pretrained_common.ArrayReader(arrays)
    take = reader.take

    def unfolded_bn(scope: str, path: str) -> None:
        for field, tree, name in (("beta", params, "bias"), ("moving_mean", stats, "mean"),
                                  ("moving_variance", stats, "var")):
            value = take(f"{scope}/{field}", 1)
            if value is not None:
                pretrained_common.set_path(tree, f"{path}/{name}", value)

    def identity_bn(conv: str, path: str) -> None:
        offset = take(f"{conv}/Conv2D_bn_offset", 1)
        if offset is not None:
            pretrained_common.set_path(params, f"{path}/bias", offset)
            pretrained_common.set_path(stats, f"{path}/mean", np.zeros_like(offset))
            pretrained_common.set_path(stats, f"{path}/var",
                                       np.full_like(offset, IDENTITY_VARIANCE))

    for name, kind, path in pretrained_common.layer_names(*repeats, names):
        if kind in ("conv_bn", "conv"):
            weight = take(f"{name}/weights", 4)
            if weight is not None:
                pretrained_common.set_path(
                    params, f"{path}/Conv_0/kernel" if kind == "conv_bn" else f"{path}/kernel",
                    weight)
            if kind == "conv":
                bias = take(f"{name}/biases", 1)
                if bias is not None:
                    pretrained_common.set_path(params, f"{path}/bias", bias)
            elif layout == "folded":
                identity_bn(name, f"{path}/BatchNorm_0")
            else:
                unfolded_bn(f"{name}/BatchNorm", f"{path}/BatchNorm_0")
        elif kind == "dense":
            weight = take(f"{name}/weights", 2)
            if weight is not None:
                pretrained_common.set_path(params, f"{path}/kernel", weight)
        else:
            unfolded_bn(name, path)

    parameters = [k for k in arrays
                  if k not in reader.used and k.rpartition("/")[2] in PARAMETER_NAMES]
    reader.problems += [f"unexpected {k}" for k in sorted(parameters)
                        if k.startswith(f"{SCOPE}/")]
    reader.problems += _scale_problems(residual_scales or {}, scopes, names.last_block)
    variables = {"params": params, "batch_stats": stats}
    if not reader.problems:
        reader.problems += pretrained_common.shape_problems(
            variables, repeats, bn_scale=False, source="the TensorFlow file")
    reader.raise_problems("the file is not davidsandberg's Inception-ResNet-v1 (bottleneck 512)")
    logits = arrays.get("Logits/weights")
    details = {"bn_layout": layout, "repeats": list(repeats),
               "ignored_keys": sorted(k for k in parameters if not k.startswith(f"{SCOPE}/")),
               "logits_classes": None if logits is None else int(logits.shape[-1])}
    return variables, details


def _scale_problems(scales: Mapping[str, float], scopes: Mapping[str, list[str]],
                    last_block: str) -> list[str]:
    expected = {scope: RESIDUAL_SCALES[stage] for stage in STAGES for scope in scopes[stage]}
    expected[last_block] = LAST_BLOCK_SCALE
    return [f"{scope} scales its residual by {value:g}, expected {expected[scope]:g}"
            for scope, value in sorted(scales.items())
            if scope in expected and not np.isclose(value, expected[scope], rtol=1e-6)]


def load_facenet_tf(path: str | pathlib.Path):
    """(model, variables) from a davidsandberg frozen graph or checkpoint, for notebooks:

        model, variables = load_facenet_tf("20180408-102900_graph_final.pb")
        embeddings = model.apply(variables, images_01, train=False)   # [N, 512]
    """
    weights = read_facenet_tf(path)
    variables, details = convert_facenet_tf(weights.arrays,
                                            residual_scales=weights.residual_scales)
    block35, block17, block8 = details["repeats"]
    return pretrained_common.build_model(block35_repeats=block35, block17_repeats=block17,
                                         block8_repeats=block8, bn_scale=False), variables


def import_facenet_tf(weights: str | pathlib.Path, workdir: str | pathlib.Path
                      ) -> dict[str, Any]:
    """`pretrained --source facenet-tf`: converts the file, writes the run folder (see
    `pretrained_common.write_run`) and returns its provenance record."""
    read = read_facenet_tf(weights)
    variables, details = convert_facenet_tf(read.arrays, residual_scales=read.residual_scales)
    info = {"source": SOURCE, "weights": str(pathlib.Path(weights).resolve()),
            "format": read.kind, "sha256": pretrained_common.sha256(read.files[0]),
            "files": {p.name: pretrained_common.sha256(p) for p in read.files}, **details,
            "input_shape": None if read.input_shape is None else list(read.input_shape)}
    # A graph's input placeholder fixes its image size (20180408-102900's: [1, 160, 160, 3]).
    size = read.input_shape[1] if read.input_shape and len(read.input_shape) == 4 else None
    config = pretrained_common.imported_config(
        bn_scale=False, repeats=tuple(details["repeats"]),
        image_size=size or pretrained_common.IMAGE_SIZE)
    pretrained_common.write_run(workdir, variables, source_info=info, config=config)
    return info
