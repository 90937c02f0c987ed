"""What every import of published FaceNet weights shares (`facenet_jax.pretrained` for
facenet-pytorch's files, `facenet_jax.pretrained_tf` for davidsandberg's TensorFlow files):
Inception-ResNet-v1's layer names in a file and in our encoder, reading a file's arrays by name,
the encoder they load into, and the step-0 run folder an import writes."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

EMBEDDING_DIM = 512
IMAGE_SIZE = 160


@dataclasses.dataclass(frozen=True)
class LayerNames:
    """One file format's names of Inception-ResNet-v1's layers, in the order our
    `InceptionResNetV1` creates the matching modules inside each scope (Flax numbers modules by
    creation; in the reductions the outer conv of a nested call is created before the ones it
    is applied to). `repeat(stage, i)` names the i-th block (0-based) of stage "block35",
    "block17" or "block8"; `join` puts a block's name and a layer's together."""

    stem: tuple[str, ...]
    block35: tuple[str, ...]
    block17: tuple[str, ...]
    block8: tuple[str, ...]
    mixed_6a: tuple[str, ...]
    mixed_7a: tuple[str, ...]
    repeat: Callable[[str, int], str]
    last_block: str
    up: str
    bottleneck: str
    last_bn: str
    join: str


_BLOCK17_8 = ("branch0", "branch1.0", "branch1.1", "branch1.2")
FACENET_PYTORCH_NAMES = LayerNames(
    stem=("conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a", "conv2d_4b"),
    block35=("branch0", "branch1.0", "branch1.1", "branch2.0", "branch2.1", "branch2.2"),
    block17=_BLOCK17_8, block8=_BLOCK17_8,
    mixed_6a=("mixed_6a.branch0", "mixed_6a.branch1.2", "mixed_6a.branch1.1",
              "mixed_6a.branch1.0"),
    mixed_7a=("mixed_7a.branch0.1", "mixed_7a.branch0.0", "mixed_7a.branch1.1",
              "mixed_7a.branch1.0", "mixed_7a.branch2.2", "mixed_7a.branch2.1",
              "mixed_7a.branch2.0"),
    repeat=lambda stage, i: f"repeat_{('block35', 'block17', 'block8').index(stage) + 1}.{i}",
    last_block="block8", up="conv2d", bottleneck="last_linear", last_bn="last_bn", join=".")


def layer_names(block35: int, block17: int, block8: int,
                names: LayerNames = FACENET_PYTORCH_NAMES) -> Iterator[tuple[str, str, str]]:
    """(the file's layer name, kind, our module path) for every layer with weights.

    kind: "conv_bn" (conv + BN), "conv" (a residual up-projection with bias), "dense" (the
    1792 -> 512 bottleneck, no bias) or "bn" (its BatchNorm).
    """
    for i, name in enumerate(names.stem):
        yield name, "conv_bn", f"ConvBN_{i}"
    residual = 0

    def block(prefix: str, layers: tuple[str, ...]) -> Iterator[tuple[str, str, str]]:
        for j, layer in enumerate(layers):
            yield (f"{prefix}{names.join}{layer}", "conv_bn",
                   f"InceptionResidual_{residual}/ConvBN_{j}")
        yield f"{prefix}{names.join}{names.up}", "conv", f"InceptionResidual_{residual}/up"

    for i in range(block35):
        yield from block(names.repeat("block35", i), names.block35)
        residual += 1
    for j, name in enumerate(names.mixed_6a, start=len(names.stem)):
        yield name, "conv_bn", f"ConvBN_{j}"
    later = ([(names.repeat("block17", i), names.block17) for i in range(block17)]
             + [(names.repeat("block8", i), names.block8) for i in range(block8)]
             + [(names.last_block, names.block8)])
    for k, (prefix, layers) in enumerate(later):
        if k == block17:
            for j, name in enumerate(names.mixed_7a,
                                     start=len(names.stem) + len(names.mixed_6a)):
                yield name, "conv_bn", f"ConvBN_{j}"
        yield from block(prefix, layers)
        residual += 1
    yield names.bottleneck, "dense", "EmbeddingHead_0/embedding"
    yield names.last_bn, "bn", "EmbeddingHead_0/embedding_bn"


class ArrayReader:
    """A converter's access to a weight file's arrays by name: `take` notes what was used and
    every problem (a missing name, a wrong number of dimensions) in `problems`."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = arrays
        self.used: set[str] = set()
        self.problems: list[str] = []

    def take(self, key: str, ndim: int) -> np.ndarray | None:
        if key not in self.arrays:
            self.problems.append(f"missing {key}")
            return None
        self.used.add(key)
        if self.arrays[key].ndim != ndim:
            self.problems.append(f"{key} has shape {self.arrays[key].shape}, expected {ndim} "
                                 "dimensions")
            return None
        return self.arrays[key]

    def raise_problems(self, what: str) -> None:
        """ValueError "the file is not WHAT: problem; problem; ..." (20 listed), if any."""
        if self.problems:
            more = len(self.problems) - 20
            raise ValueError(f"{what}: " + "; ".join(self.problems[:20])
                             + (f"; ... {more} more" if more > 0 else ""))


def set_path(tree: dict[str, Any], path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def build_model(*, block35_repeats: int = 5, block17_repeats: int = 10,
                block8_repeats: int = 5, bn_scale: bool = True):
    """Our encoder with facenet-pytorch's layout (eval only: no BN axis); bn_scale=False is
    davidsandberg's TF layout (BNs with an offset and no scale)."""
    from facenet_jax import models

    return models.create_model(
        "inception_resnet_v1", embedding_dim=EMBEDDING_DIM, bn_scale=bn_scale,
        input_norm="fixed_standardization", block35_repeats=block35_repeats,
        block17_repeats=block17_repeats, block8_repeats=block8_repeats)


def shape_problems(variables: dict[str, Any], repeats: tuple[int, int, int], *,
                   bn_scale: bool = True, source: str = "the state_dict") -> list[str]:
    """Each converted array against the shape our encoder (block repeats `repeats`) creates,
    named by its path; [] when all match."""
    import jax
    import jax.numpy as jnp

    from facenet_jax.finetune import structure_problems

    block35, block17, block8 = repeats
    model = build_model(block35_repeats=block35, block17_repeats=block17,
                        block8_repeats=block8, bn_scale=bn_scale)
    expected = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False))
    return structure_problems(dict(expected), variables, source=source)


def sha256(path: str | pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def imported_config(*, bn_scale: bool = True, repeats: tuple[int, int, int] = (5, 10, 5),
                    image_size: int = IMAGE_SIZE):
    """The run config of an imported model: the default config with FaceNet's encoder
    (512-d, fixed standardisation; affine BNs for facenet-pytorch's files, `bn_scale=False`
    for davidsandberg's TF files; `repeats` of block35, block17, block8), crops of FaceNet's
    box alignment (160 px unless the file says otherwise)."""
    from facenet_jax.config import load_config

    default = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
    blocks = "model.inception_resnet_v1"
    return load_config(default, {
        "model.name": "inception_resnet_v1", "model.embedding_dim": EMBEDDING_DIM,
        "model.bn_scale": bn_scale, "model.input_norm": "fixed_standardization",
        f"{blocks}.block35_repeats": repeats[0], f"{blocks}.block17_repeats": repeats[1],
        f"{blocks}.block8_repeats": repeats[2],
        "data.source": "folder", "data.image_size": image_size, "data.alignment": "box",
        "eval.batch_size": 64})


def write_run(workdir: str | pathlib.Path, variables: dict[str, Any], *,
              source_info: dict[str, Any], config=None) -> pathlib.Path:
    """Writes DIR/config.json (config + provenance + `source_info`) and the step-0 checkpoint
    of a train state holding `variables`. Refuses a DIR that already holds checkpoints."""
    import jax
    import jax.numpy as jnp

    from facenet_jax import checkpoints, finetune, parallel, runfiles
    from facenet_jax.state import build_model as build_run_model
    from facenet_jax.state import build_optimizer, create_train_state, state_from_variables

    workdir = pathlib.Path(workdir).resolve()
    if checkpoints.latest_step(workdir) is not None:
        raise FileExistsError(f"{workdir} already holds checkpoints; choose a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    config = config or imported_config()
    tx, _ = build_optimizer(config)
    expected = jax.eval_shape(lambda: create_train_state(
        config, build_run_model(config, bn_axis_name=None), tx))
    finetune.check_structure(expected.variables, variables, source="the converted weights",
                             hint="Give write_run a config that builds the imported encoder "
                                  "(pretrained.imported_config())")
    state = state_from_variables(config, jax.tree.map(jnp.asarray, variables), tx)
    mesh = parallel.make_mesh()
    manager = checkpoints.make_manager(workdir, max_to_keep=config.keep_checkpoints)
    checkpoints.save(manager, 0, parallel.put_replicated(state, mesh))
    manager.close()
    runfiles.write_config(workdir, config, imported=source_info)
    return workdir
