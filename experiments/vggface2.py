"""VGGFace2 with ResNet-50: triplet-only training at FaceNet's batch size on an accelerator.

Reproduces: the VGGFace2 training set (8,631 people, 3.1M images; Cao et al., FG 2018) with the
ResNet-50 of that paper, trained with FaceNet's triplet recipe instead of softmax: batches of
45 identities × 40 images = 1,800 faces, TF-Addons-style `semihard` mining, α = 0.2 on
*squared* distance between unit vectors, 128-d embeddings. Optimiser: Adam with
davidsandberg/facenet's published VGGFace2 schedule (learning rate 0.05, ×0.1 at epochs 100
and 200 of 275, i.e. at 36% and 73% of the run; weight decay 5e-4 as L2), published there for
its softmax classifier; that schedule used Adam's ε = 0.1, which this config cannot set (optax
default 1e-8), so a triplet-only run may need a lower peak (try --config.optimizer.
learning_rate=1e-3) or warm-up: the sweep tooling is the place to find it.

Hardware: accelerators. Not measured here (this project's CPU machine cannot run it); time one
step with
        python benchmarks/train_step.py --models resnet50 --batches 45x40 --devices 1
and multiply by num_steps (300,000 steps ≈ 175 passes over the data). The memory-mapped uint8
cache at 160 px is ~240 GB: put data.cache_dir on a large local disk. P = 45 needs a device
count dividing 45 (1, 3, 5, 9, 15); on 8 devices pass --config.batch.identities=48 (or 40).
--config.model.dtype=bfloat16 roughly halves the step time where supported.

Data: the VGGFace2 train folder (one folder per person, n000002 …), faces aligned to 182 px
with a 44 px margin as for casia_webface.py; the central 160/182 is kept and resized to 160 px.

        python -m facenet_jax.train --config experiments/vggface2.py --workdir runs/vggface2 \
            --config.data.root=/data/vggface2_train_182 --config.data.cache_dir=/scratch/cache
        python -m facenet_jax.evaluate --workdir runs/vggface2 --data_root /data/lfw_182 \
            --pairs /data/lfw/pairs.txt --output runs/vggface2/eval_lfw.json
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "default.py"))["get_config"]()
    config.num_steps = 300_000
    config.log_every = 100
    config.eval_every = 10_000
    config.checkpoint_every = 5_000
    data = config.data
    data.source = "folder"  # pass --config.data.root=PATH
    data.image_size = 160
    data.center_crop = 160 / 182
    data.split.train, data.split.validation, data.split.test = 0.98, 0.01, 0.01
    data.augment.crop_padding = 8
    data.prefetch = 8
    config.batch.identities = 45
    config.batch.images_per_identity = 40
    config.loss.strategy = "semihard"
    config.loss.margin = 0.2
    config.loss.distance = "squared"
    config.model.name = "resnet50"
    config.model.embedding_dim = 128
    opt = config.optimizer
    opt.name = "adam"
    opt.learning_rate = 0.05
    opt.schedule = "piecewise"
    opt.warmup_steps = 0
    opt.decay_boundaries = (100 / 275, 200 / 275)
    opt.decay_factor = 0.1
    opt.weight_decay = 5e-4
    config.eval.batch_size = 720
    return config
