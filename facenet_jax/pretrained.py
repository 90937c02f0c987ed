"""Published FaceNet weights in Flax: facenet-pytorch's Inception-ResNet-v1 `state_dict` files
and davidsandberg/facenet's own TensorFlow files (`facenet_jax.pretrained_tf`).

    python -m facenet_jax.pretrained --source facenet-pytorch --weights FILE.pt --workdir DIR
    python -m facenet_jax.pretrained --source facenet-tf --weights FILE.pb --workdir DIR
    python -m facenet_jax.pretrained --source facenet-tf --weights model-DATE.ckpt-N --workdir DIR

writes a run folder (config.json with provenance, including the weight file's SHA-256, and an
orbax checkpoint at step 0) that `embed --workdir`, `evaluate --workdir DIR --data_root ...`
and `train` with `--config.model.init_from=DIR` accept as they accept a trained run. It holds no
split.json: it was trained on none of our splits. `load_facenet_pytorch(FILE)` returns the same
(model, variables) for notebooks.

The files (davidsandberg/facenet's VGGFace2 and CASIA-WebFace models, converted by
facenet-pytorch: `20180402-114759-vggface2.pt`, `20180408-102900-casia-webface.pt`) map onto
`inception_resnet_v1` with `bn_scale=True` (their BNs are affine), `embedding_dim=512` and
`input_norm="fixed_standardization"` on RGB 160 px crops. Reading `.pt` needs torch, an optional
extra: `pip install 'facenet_jax[pretrained]'`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

SOURCES = ("facenet-pytorch", "facenet-tf")
TORCH_HINT = ("reading facenet-pytorch's .pt files needs torch, an optional extra: "
              "pip install 'facenet_jax[pretrained]' (or pip install torch; a CPU wheel is "
              "enough)")
EMBEDDING_DIM = 512
IMAGE_SIZE = 160
# Entries of facenet-pytorch's files that the encoder does not use: the classifier of the
# training identities (8,631 for VGGFace2, 10,575 for CASIA-WebFace) and BN step counters.
_IGNORED_PREFIX = "logits."
_IGNORED_SUFFIX = ".num_batches_tracked"

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


def convert_facenet_pytorch(state_dict: Mapping[str, Any], *, block35_repeats: int = 5,
                            block17_repeats: int = 10, block8_repeats: int = 5
                            ) -> tuple[dict[str, Any], list[str]]:
    """facenet-pytorch `InceptionResnetV1` state_dict (arrays or tensors) -> our variables.

    Returns ({"params", "batch_stats"} of `inception_resnet_v1` with bn_scale=True and
    embedding_dim=512, float32 numpy; the ignored `logits.*` keys). Conv kernels
    [O, I, kh, kw] become [kh, kw, I, O], the bottleneck [512, 1792] becomes [1792, 512].
    Raises ValueError naming every missing, unexpected or wrong-shaped key.
    """
    arrays = {k: np.asarray(_to_numpy(v), dtype=np.float32) for k, v in state_dict.items()}
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    reader = ArrayReader(arrays)
    take = reader.take

    def bn(torch_name: str, path: str) -> None:
        for field, tree, name in (("weight", params, "scale"), ("bias", params, "bias"),
                                  ("running_mean", stats, "mean"),
                                  ("running_var", stats, "var")):
            value = take(f"{torch_name}.{field}", 1)
            if value is not None:
                set_path(tree, f"{path}/{name}", value)

    for torch_name, kind, path in layer_names(block35_repeats, block17_repeats,
                                               block8_repeats):
        if kind in ("conv_bn", "conv"):
            weight_key = f"{torch_name}.conv.weight" if kind == "conv_bn" else (
                f"{torch_name}.weight")
            conv_path = f"{path}/Conv_0" if kind == "conv_bn" else path
            weight = take(weight_key, 4)
            if weight is not None:
                set_path(params, f"{conv_path}/kernel", weight.transpose(2, 3, 1, 0))
            if kind == "conv_bn":
                bn(f"{torch_name}.bn", f"{path}/BatchNorm_0")
            else:
                bias = take(f"{torch_name}.bias", 1)
                if bias is not None:
                    set_path(params, f"{path}/bias", bias)
        elif kind == "dense":
            weight = take(f"{torch_name}.weight", 2)
            if weight is not None:
                set_path(params, f"{path}/kernel", weight.T)
        else:
            bn(torch_name, path)

    ignored = sorted(k for k in arrays if k.startswith(_IGNORED_PREFIX))
    unexpected = sorted(k for k in arrays if k not in reader.used and k not in ignored
                        and not k.endswith(_IGNORED_SUFFIX))
    reader.problems += [f"unexpected {k}" for k in unexpected]
    variables = {"params": params, "batch_stats": stats}
    if not reader.problems:
        reader.problems += shape_problems(variables, (block35_repeats, block17_repeats,
                                                      block8_repeats))
    reader.raise_problems(
        "the state_dict is not facenet-pytorch's InceptionResnetV1 (embedding 512)")
    return variables, ignored


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (without importing torch) or an array -> numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


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


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A `.pt` state_dict as numpy arrays (torch.load with weights_only: no code runs)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        import torch
    except ImportError as error:
        raise ImportError(TORCH_HINT) from error
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    return {k: _to_numpy(v) for k, v in loaded.items()}


def load_facenet_pytorch(path: str | pathlib.Path):
    """(model, variables) from a facenet-pytorch weight file, for notebooks:

        model, variables = load_facenet_pytorch("20180402-114759-vggface2.pt")
        embeddings = model.apply(variables, images_01, train=False)   # [N, 512]
    """
    variables, _ = convert_facenet_pytorch(read_state_dict(path))
    return build_model(), variables


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


def import_weights(weights: str | pathlib.Path, workdir: str | pathlib.Path, *,
                   source: str = "facenet-pytorch") -> dict[str, Any]:
    """The CLI's work: converts `weights` and writes the run folder; returns the provenance."""
    if source not in SOURCES:
        raise ValueError(f"unknown --source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "facenet-tf":
        from facenet_jax import pretrained_tf

        return pretrained_tf.import_facenet_tf(weights, workdir)
    state_dict = read_state_dict(weights)
    variables, ignored = convert_facenet_pytorch(state_dict)
    logits = state_dict.get("logits.weight")
    info = {"source": source, "weights": str(pathlib.Path(weights).resolve()),
            "sha256": sha256(weights), "ignored_keys": ignored,
            "logits_classes": None if logits is None else int(logits.shape[0])}
    write_run(workdir, variables, source_info=info)
    return info


def main(argv: list[str]) -> None:
    from absl import flags

    from facenet_jax.cli import cli_logging

    del argv
    cli_logging()
    flags_ = flags.FLAGS
    info = import_weights(flags_.weights, flags_.workdir, source=flags_.source)
    logits = (f"; ignored the {info['logits_classes']}-class logits layer"
              if info["logits_classes"] else "")
    layout = f", {info['bn_layout']} BatchNorms" if "bn_layout" in info else ""
    print(f"wrote {flags_.workdir} (step-0 checkpoint of inception_resnet_v1, 512-d{layout}, "
          f"sha256 {info['sha256'][:12]}...{logits})")


if __name__ == "__main__":
    from absl import flags

    from facenet_jax import cli

    flags.DEFINE_enum("source", "facenet-pytorch", list(SOURCES), "where the weights come from")
    flags.DEFINE_string("weights", None, "facenet-pytorch: a state_dict file (.pt); "
                        "facenet-tf: a frozen graph (.pb) or a checkpoint prefix "
                        "(model-DATE.ckpt-N)")
    flags.DEFINE_string("workdir", None, "run folder to write")
    flags.mark_flags_as_required(["weights", "workdir"])
    cli.run(main)
