"""Embedding images with a trained encoder: the one-shot use of a model.

    python -m facenet_jax.embed --workdir DIR --data_root FOLDER --output FILE.npz

Public API: `make_embedder` (jitted, sharded over the devices, fixed batch shape so the last
partial batch never recompiles), `load_encoder(workdir)` → `Encoder` with `.embed(images)`,
`.embed_files(paths)`, `.distance(a, b)` and `.verify(a, b)` (images or embeddings; the run's
eval.distance and its chosen threshold, `.threshold_info` says where it was chosen) and
`.verify_files(a, b)` (image files; the CLI `python -m facenet_jax.verify` prints its verdict).
The notebooks, the evaluation and training all use it.

The CLI's .npz holds: embeddings float32 [N,D], labels int [N] (index into identity_names),
identity_names str [C], paths str [N], step (the checkpoint's), distance (the run's
eval.distance), threshold (the run's verification threshold in that distance; NaN when the run
has none) and threshold_split (the split it was chosen on: "validation", "test" or "none").
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import checkpoints, parallel
from facenet_jax.cli import cli_logging
from facenet_jax.config import apply_evaluation_overrides
from facenet_jax.eval.metrics import FLIP_MODES, pair_distances, validate_eval_config
from facenet_jax.eval.threshold import run_threshold
from facenet_jax.runfiles import atomic_write_with, load_run_config
from facenet_jax.state import build_model, encoder_fields, encoder_variables

Embedder = Callable[[Any, np.ndarray], np.ndarray]


def make_embedder(model: Any, mesh: jax.sharding.Mesh, *, batch_size: int, flip: bool = False,
                  flip_mode: str = "sum") -> Embedder:
    """Returns embed(variables, images uint8 [N,H,W,3]) -> float32 [N,D] (numpy).

    Batches of `batch_size` (a multiple of the device count) are split over the devices; the
    last batch is zero-padded to the same shape so one compiled program serves every N.
    flip=True also embeds the mirror image: "sum" adds both embeddings and renormalises
    (the result stays D-dimensional and unit-norm); "concat" concatenates them, [N, 2D], each
    half unit-norm (distances then add the two views' distances).
    """
    if flip_mode not in FLIP_MODES:
        raise ValueError(f"flip_mode must be one of {FLIP_MODES}, got {flip_mode!r}")
    if batch_size % mesh.size:
        raise ValueError(f"embedding batch_size={batch_size} must be a multiple of the "
                         f"{mesh.size} devices")

    def per_device(variables: Any, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) / 255.0
        embeddings = model.apply(variables, x, train=False)
        if flip:
            mirrored = model.apply(variables, x[:, :, ::-1, :], train=False)
            if flip_mode == "sum":
                # Divided by the norm, not l2_normalize's rsqrt: recorded flip evaluations
                # (thresholds in eval.json) stay reproducible to the bit.
                summed = embeddings + mirrored
                embeddings = summed / jnp.maximum(
                    jnp.linalg.norm(summed, axis=-1, keepdims=True), 1e-12)
            else:
                embeddings = jnp.concatenate([embeddings, mirrored], axis=-1)
        return lax.all_gather(embeddings, parallel.AXIS, tiled=True)

    compiled = parallel.shard_per_device(per_device, mesh, in_specs=(P(), P(parallel.AXIS)),
                                         out_specs=P())
    sharding = parallel.batch_sharded(mesh)

    def embed(variables: Any, images: np.ndarray) -> np.ndarray:
        count = len(images)
        outputs = []
        chunks = range(0, count, batch_size)
        if count > 20 * batch_size and sys.stderr.isatty():
            from tqdm import tqdm
            chunks = tqdm(chunks, desc="embedding", unit="batch")
        for start in chunks:
            chunk = np.asarray(images[start:start + batch_size])
            padded = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
            padded[:len(chunk)] = chunk
            device_chunk = jax.make_array_from_callback(padded.shape, sharding,
                                                        lambda index: padded[index])
            outputs.append(parallel.to_host(compiled(variables, device_chunk))[:len(chunk)])
        if not outputs:
            raise ValueError("no images to embed")
        return np.concatenate(outputs).astype(np.float32)

    return embed


@dataclasses.dataclass
class Encoder:
    """A trained encoder restored from a run folder."""

    config: ml_collections.ConfigDict
    variables: Any
    step: int
    embedder: Embedder
    workdir: pathlib.Path | None = None  # where .threshold_info is read from

    def embed(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 [N,H,W,3] at the run's image size → embeddings [N,D], unit-norm
        (with eval.flip_mode="concat": [N,2D], each half unit-norm)."""
        size = self.config.data.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected uint8 images [N,{size},{size},3] (the run's "
                             f"data.image_size), got shape {images.shape}")
        return self.embedder(self.variables, images)

    def embed_files(self, paths: Sequence[str | pathlib.Path]) -> np.ndarray:
        """Decodes and preprocesses files exactly as the run's data config says, then embeds."""
        from facenet_jax import data

        images = data.load_images(paths, image_size=self.config.data.image_size,
                                  center_crop=self.config.data.center_crop)
        return self.embed(images)

    @property
    def threshold_info(self) -> dict[str, Any]:
        """The run's verification threshold: {"threshold", "distance", "split" (where it was
        chosen: "validation", or "test" for runs without a validation evaluation), "step",
        "source" (the file), "num_identities", "num_pairs", "num_different_pairs" (what it was
        chosen on), "warning" (below 20 identities or 200 different pairs, else None)}; see
        threshold.run_threshold."""
        if self.workdir is None:
            raise ValueError("this Encoder was not loaded from a run folder; pass threshold=")
        return run_threshold(self.workdir)

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Distances [N] between a[i] and b[i] in the run's eval.distance, the distance its
        threshold is in. Each of a and b is images (uint8 [N,H,W,3], or one image [H,W,3]) or
        embeddings (float [N,D], or one [D]; D the run's model.embedding_dim), see
        `as_embeddings`."""
        a, b = self.as_embeddings(a), self.as_embeddings(b)
        if len(a) != len(b):
            raise ValueError(f"a and b must hold as many images or embeddings, got {len(a)} "
                             f"and {len(b)}")
        index = np.arange(len(a))
        return pair_distances(np.concatenate([a, b]), index, index + len(a),
                              self.config.eval.distance)

    def verify(self, a: np.ndarray, b: np.ndarray, threshold: float | None = None
               ) -> np.ndarray:
        """bool [N]: is a[i] the same person as b[i]? True iff distance(a, b) ≤ threshold,
        by default the run's (`threshold_info`: chosen on its validation split). a, b: images
        or embeddings, as `distance` takes them."""
        if threshold is None:
            threshold = self.threshold_info["threshold"]
        return self.distance(a, b) <= threshold

    def verify_files(self, a: str | pathlib.Path | Sequence[str | pathlib.Path],
                     b: str | pathlib.Path | Sequence[str | pathlib.Path],
                     threshold: float | None = None) -> np.ndarray:
        """bool [N]: is the face in file a[i] the same person as in file b[i]? (one path or a
        list each). The files are decoded and preprocessed as the run's data config says
        (`embed_files`), then compared as `verify` does."""
        return self.verify(self.embed_files(_path_list(a)), self.embed_files(_path_list(b)),
                           threshold)

    def as_embeddings(self, x: np.ndarray) -> np.ndarray:
        """float32 [N,D] embeddings from images or embeddings: uint8 [H,W,3] or [N,H,W,3] are
        images (embedded); float [D] or [N,D], D the run's model.embedding_dim, are embeddings
        (returned as they are). Anything else is a ValueError naming both forms."""
        x = np.asarray(x)
        dim = self.config.model.embedding_dim
        if x.dtype == np.uint8 and x.ndim in (3, 4) and x.shape[-1] == 3:
            return self.embed(x[None] if x.ndim == 3 else x)
        if np.issubdtype(x.dtype, np.floating) and x.ndim in (1, 2) and x.shape[-1] == dim:
            return np.atleast_2d(x).astype(np.float32)
        size = self.config.data.image_size
        raise ValueError(f"expected images (uint8 [H,W,3] or [N,H,W,3], {size}x{size} for this "
                         f"run) or embeddings (float [{dim}] or [N,{dim}]), got {x.dtype} of "
                         f"shape {x.shape}")


def _path_list(paths: str | pathlib.Path | Sequence[str | pathlib.Path]
               ) -> list[str | pathlib.Path]:
    """One path → [path]; a sequence of paths unchanged."""
    return [paths] if isinstance(paths, (str, pathlib.Path)) else list(paths)


def load_encoder(workdir: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
                 flip: bool | None = None, eval_overrides: Mapping[str, str] | None = None
                 ) -> Encoder:
    """Restores the latest loadable checkpoint of `workdir` (params and BN statistics).

    The encoder embeds as the run's config.eval says (flip, flip_mode, batch_size), with
    `eval_overrides` ({"eval.flip_mode": "concat"}: config.apply_evaluation_overrides, then
    metrics.validate_eval_config, before anything is restored) applied to its config; flip,
    when given, wins over both.
    """
    config = load_run_config(workdir)
    if eval_overrides:
        config = apply_evaluation_overrides(config, eval_overrides)
        validate_eval_config(config.eval)
    mesh = mesh or parallel.make_mesh()
    model = build_model(config, bn_axis_name=None)
    size = config.data.image_size
    # Shapes and shardings are all a restore needs: initialising real parameters (a minute for
    # inception_resnet_v1 on a CPU) would only be overwritten. Only the encoder's variables are
    # read: not its optimizer state, nor an objective's class centres.
    replicated = parallel.replicated(mesh)
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                          jnp.zeros((1, size, size, 3), jnp.float32),
                                          train=False)))
    manager = checkpoints.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                       read_only=True)
    restored = checkpoints.restore_latest(manager, encoder_fields(target), partial=True)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints.checkpoint_dir(workdir)}")
    variables, step = encoder_variables(restored[0]), restored[1]
    batch_size = _round_up(config.eval.batch_size, mesh.size)
    embedder = make_embedder(model, mesh, batch_size=batch_size,
                             flip=config.eval.flip if flip is None else flip,
                             flip_mode=config.eval.flip_mode)
    return Encoder(config=config, variables=variables, step=step, embedder=embedder,
                   workdir=pathlib.Path(workdir))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def main(argv: list[str]) -> None:
    from absl import flags

    from facenet_jax import data

    del argv
    cli_logging()
    flags_ = flags.FLAGS
    encoder = load_encoder(flags_.workdir, flip=flags_.flip)
    folder = data.load_folder_as_configured(flags_.data_root, encoder.config.data,
                                            min_images_per_identity=1)
    embeddings = encoder.embed(folder.images)
    output = pathlib.Path(flags_.output)
    if output.suffix != ".npz":  # np.savez's own naming rule
        output = output.with_name(output.name + ".npz")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        chosen = encoder.threshold_info
    except FileNotFoundError:  # an unfinished run: embeddings without a threshold
        chosen = {"threshold": float("nan"), "split": "none"}
    # A cut-off write must not leave a truncated file where an earlier one was.
    atomic_write_with(output, lambda f: np.savez(
        f, embeddings=embeddings, labels=folder.labels,
        identity_names=np.asarray(folder.identity_names),
        paths=np.asarray(folder.paths if folder.paths is not None else []),
        step=encoder.step, distance=encoder.config.eval.distance,
        threshold=chosen["threshold"], threshold_split=chosen["split"]))
    print(f"wrote {len(embeddings)} embeddings of {folder.num_identities} identities "
          f"(step {encoder.step}) to {output}")


def define_flags() -> None:
    """The flags of `python -m facenet_jax.embed` (absl), defined once by that module."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "trained run folder")
    flags.DEFINE_string("data_root", None, "image folder root/<identity>/<image>")
    flags.DEFINE_string("output", None, "output .npz")
    flags.DEFINE_bool("flip", None, "also embed mirrored images (default: the run's eval.flip)")
    flags.mark_flags_as_required(["workdir", "data_root", "output"])
