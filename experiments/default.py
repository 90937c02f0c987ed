"""The embedded default: synthetic faces, the small conv net, semi-hard mining, FaceNet's α.

Reproduces: nothing published; it is the project's smoke-scale main job. Synthetic faces at 32 px
(no download), `small_cnn`, TF-Addons-style `semihard` mining on squared Euclidean distance with
α = 0.2 (FaceNet's margin, which only means something on squared distances between unit vectors).
Hardware: a 2-core CPU; finishes, compile included, in a few minutes and reaches ≥ 0.95 10-fold
verification accuracy on held-out synthetic identities (see the README for the measured figure).

        python -m facenet_jax.train --config experiments/default.py --workdir runs/default

`get_config("runlocal")` (on the command line `--config experiments/default.py:runlocal`) is the
same config shrunk to seconds (big_vision's `runlocal`): 8 steps on 40 synthetic identities at
16 px, a batch of 8 × 2, 16-d embeddings. The tests build on it; it checks that the code runs,
not what it learns.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from facenet_jax import models
from facenet_jax.config import set_dotted


# What "runlocal" changes: every checkpoint/eval action happens within its 8 steps; P = 8 and the
# eval batch of 64 divide by any device count up to 8; 40 identities split 32/4/4.
RUNLOCAL = {
    "num_steps": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
    "data.image_size": 16, "data.synthetic.num_identities": 40,
    "data.synthetic.images_per_identity": 6, "batch.identities": 8,
    "batch.images_per_identity": 2, "data.pairs.pairs_per_fold": 20, "eval.batch_size": 64,
    "model.embedding_dim": 16, "optimizer.schedule": "constant",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the full config: every key other configs and the CLI may override lives here.

    arg: None (the main job) or "runlocal" (the tiny preset above).
    """
    if arg not in (None, "", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r} for experiments/default.py; use "
                         "experiments/default.py (the main job) or experiments/default.py:runlocal")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_steps = 1200
    config.log_every = 50
    config.eval_every = 400
    config.checkpoint_every = 400
    config.keep_checkpoints = 3

    config.data = data = ml_collections.ConfigDict()
    data.source = "synthetic"  # synthetic | folder | tfds | rec
    data.root = placeholder(str)
    data.name = placeholder(str)
    data.image_size = 32
    data.center_crop = placeholder(float)
    data.cache_dir = placeholder(str)  # unset: $FACENET_JAX_CACHE_DIR, else ~/.cache/facenet_jax
    data.skip_bad_files = False
    data.tfds_split = "train"
    data.tfds_data_dir = placeholder(str)
    data.min_images_per_identity = 2
    data.synthetic = ml_collections.ConfigDict(
        dict(num_identities=500, images_per_identity=20, difficulty=1.0, seed=0))
    # exclude_pairs_file: people named in that pairs file go to the test split, taken from
    # train and validation;
    # exclude_pairs_fold=k: only the people of that file's fold k (1-based), as the LFW
    # cross-validation (python -m facenet_jax.crossval) trains fold k.
    data.split = ml_collections.ConfigDict(dict(
        train=0.8, validation=0.1, test=0.1, seed=0,
        identity_files=placeholder(str), exclude_pairs_file=placeholder(str),
        exclude_pairs_fold=placeholder(int)))
    # pairs.seed: the evaluation pairs' seed; unset, it follows `seed`. Pin it to vary `seed`
    # (training) while scoring every seed on the same pairs.
    data.pairs = ml_collections.ConfigDict(dict(num_folds=10, pairs_per_fold=300,
                                                seed=placeholder(int)))
    data.augment = ml_collections.ConfigDict(dict(crop_padding=2, flip=True))
    # Training batches: "pk" (P identities × K images, what triplet mining needs) or "uniform"
    # (every image once per epoch, for classification; batch.identities × images_per_identity
    # is then only the batch size). See docs/data.md.
    data.sampler = "pk"
    data.prefetch = 4
    # "cache" (decode once: folder, synthetic, tfds) or "stream" (decode each batch in
    # data.workers processes: rec, always); unset: the source's own. data.workers unset: the
    # host's cores less one (at most 16) with the stream extra installed, else 0 (a thread).
    data.pipeline = placeholder(str)
    data.workers = placeholder(int)
    # The crops a model expects ("box": FaceNet-style margin crop, "landmarks": ArcFace-style
    # 5-point alignment; see `python -m facenet_jax.align`); None: not recorded.
    data.alignment = placeholder(str)

    config.batch = ml_collections.ConfigDict(dict(identities=32, images_per_identity=4))

    config.loss = loss = ml_collections.ConfigDict()
    loss.strategy = "semihard"
    loss.margin = 0.2
    loss.distance = "squared"
    loss.soft = False
    # Strategy-specific settings, e.g. distance_weighted's cutoff / nonzero_loss_cutoff.
    loss.options = ml_collections.ConfigDict()
    # Mine with warmup_strategy (e.g. "semihard") for the first warmup_steps steps, then with
    # strategy: a batch-hard run that starts from semi-hard (docs/outputs_and_verification.md).
    loss.warmup_strategy = placeholder(str)
    loss.warmup_steps = 0
    # Cross-batch memory (Wang et al. 2020; facenet_jax/losses/memory.py): size 0 = off.
    loss.memory = ml_collections.ConfigDict(dict(size=0, start_step=0, weight=1.0))
    # What the run optimises: "triplet" (the keys above), "classification" (a margin-softmax
    # head over the training identities, its centres sharded over the devices) or "combined"
    # (classification + triplet_weight × the triplet loss of the same batch).
    loss.kind = "triplet"
    loss.triplet_weight = 1.0
    # head: softmax | normface | cosface | arcface; scale (s) and margin (m) unset: the head's
    # paper values (s = 64; CosFace m = 0.35, ArcFace m = 0.5); sample_fraction < 1: Partial FC.
    loss.classification = ml_collections.ConfigDict(dict(
        head="arcface", scale=placeholder(float), margin=placeholder(float),
        sample_fraction=1.0))

    config.model = ml_collections.ConfigDict(
        dict(name="small_cnn", embedding_dim=128, dtype="float32"))
    # Pixel mapping before the first layer: "symmetric" (2x - 1) or "fixed_standardization"
    # ((255x - 127.5) / 128, what imported FaceNet weights expect); see models.INPUT_NORMS.
    config.model.input_norm = "symmetric"
    config.model.bn_scale = False  # inception_resnet_v1 only: affine BNs (facenet-pytorch's)
    # A run folder (trained, or written by `python -m facenet_jax.pretrained`) whose newest
    # checkpoint's encoder starts this run (fine-tuning); read, never written.
    config.model.init_from = placeholder(str)
    # True (with init_from and optimizer.backbone_lr_multiplier=0): the frozen backbone's features
    # of each training image and its mirror are computed once, in eval mode, and the embedding
    # head alone trains on them (facenet_jax/features_cache.py).
    config.model.cached_features = False
    # A folder that keeps those features across runs from the same backbone (crossval's folds):
    # one file per image, keyed by the backbone's variables and the image's pixels.
    config.model.cached_features_dir = placeholder(str)
    # Each encoder's own fields (widths, depths, dropout_rate, bn_momentum, ...), one block per
    # model name, filled from the registered modules' defaults: e.g.
    # --config.model.small_cnn.widths=(32,64,128,256). Only the block of model.name is used.
    for name in models.ENCODERS.names():
        config.model[name] = ml_collections.ConfigDict(models.default_fields(name))

    config.optimizer = opt = ml_collections.ConfigDict()
    opt.name = "adam"  # adagrad | adam | adamw | sgd
    opt.learning_rate = 3e-3
    opt.schedule = "cosine"  # cosine | piecewise | constant
    opt.warmup_steps = 100
    opt.decay_boundaries = (0.5, 0.75)  # piecewise: fractions of num_steps
    opt.decay_factor = 0.1
    opt.weight_decay = 0.0
    opt.grad_clip_norm = 10.0
    opt.momentum = 0.9
    # Learning-rate factor of the backbone (everything but the embedding head) relative to the
    # head: 1.0 trains all alike, 0 freezes the backbone's parameters and BN statistics.
    opt.backbone_lr_multiplier = 1.0

    config.parallel = ml_collections.ConfigDict(
        dict(mining="global", distributed=False))

    config.eval = ml_collections.ConfigDict(dict(batch_size=256, flip=False, distance="squared"))
    # The evaluation protocol (evaluation-only: `evaluate --workdir` may change them with
    # --config.eval.KEY=V). flip_mode: how flip combines the mirror image's embedding, "sum"
    # (renormalised) or "concat" ([N, 2D], davidsandberg's --use_flipped_images). distance may
    # also be "angular" (arccos(cos)/π, davidsandberg's --distance_metric 1). subtract_mean:
    # subtract the training folds' mean pair embedding before the fold's distances
    # (davidsandberg's --subtract_mean). threshold_search: "exact" (every achievable threshold)
    # or "grid" (davidsandberg's np.arange(0, 4, 0.01) with d < t). See docs/evaluation.md.
    config.eval.flip_mode = "sum"
    config.eval.subtract_mean = False
    config.eval.threshold_search = "exact"
    # A folder of insightface .bin sets (lfw.bin, cfp_fp.bin, ...) evaluated every eval_every
    # steps, logged as eval/<set>/accuracy; None: off. Names: comma-separated, None: every set.
    config.eval.verification_sets = placeholder(str)
    config.eval.verification_set_names = placeholder(str)
    if arg == "runlocal":
        for key, value in RUNLOCAL.items():
            set_dotted(config, key, value)
    return config
