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

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from facenet_jax import pretrained_tf
# The shared parts, public here too (notebooks: pretrained.build_model, write_run, ...).
from facenet_jax.pretrained_common import (  # noqa: F401
    EMBEDDING_DIM, FACENET_PYTORCH_NAMES, IMAGE_SIZE, ArrayReader, LayerNames, build_model,
    imported_config, layer_names, set_path, sha256, shape_problems, write_run)

SOURCES = ("facenet-pytorch", "facenet-tf")
TORCH_HINT = ("reading facenet-pytorch's .pt files needs torch, an optional extra: "
              "pip install 'facenet_jax[pretrained]' (or pip install torch; a CPU wheel is "
              "enough)")
# Entries of facenet-pytorch's files that the encoder does not use: the classifier of the
# training identities (8,631 for VGGFace2, 10,575 for CASIA-WebFace) and BN step counters.
_IGNORED_PREFIX = "logits."
_IGNORED_SUFFIX = ".num_batches_tracked"


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


def import_weights(weights: str | pathlib.Path, workdir: str | pathlib.Path, *,
                   source: str = "facenet-pytorch") -> dict[str, Any]:
    """The CLI's work: converts `weights` and writes the run folder; returns the provenance."""
    if source not in SOURCES:
        raise ValueError(f"unknown --source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "facenet-tf":
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
