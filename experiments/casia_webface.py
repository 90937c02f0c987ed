"""CASIA-WebFace at FaceNet's scale: triplet-only training from scratch on an accelerator.

Reproduces: FaceNet's training recipe (Schroff et al., CVPR 2015) on CASIA-WebFace (10,575
people, 494k images) with davidsandberg/facenet's Inception-ResNet-v1 at 160 px: batches of 45
identities × 40 images = 1,800 faces, `semihard_facenet` mining (FaceNet's wording: a random
negative with d(a,p) < d(a,n) < d(a,p) + α), α = 0.2 on *squared* distance between unit
vectors, 128-d embeddings, AdaGrad with the paper's initial learning rate 0.05, lowered (here
×0.1 at 60% and 85% of the run) to finalise the model, no warm-up.
Expect less than the published 99.63% on LFW: FaceNet trained on 100M–200M private images;
public triplet-only runs on CASIA land around 0.80–0.92 (davidsandberg/facenet's issue threads).

Hardware: accelerators. Not measured here (this project's CPU machine cannot run it); time one
step on your hardware with
        python benchmarks/train_step.py --models inception_resnet_v1 --batches 45x40 --devices 1
and multiply by num_steps (200,000 steps ≈ 730 passes over the data). Memory: the O(B²)
miners keep the 1,800-image loss far below the encoder's activations. The input pipeline
decodes the folder once into a memory-mapped uint8 cache (~38 GB at 160 px) under
data.cache_dir. P = 45 needs a device count dividing 45 (1, 3, 5, 9, 15); on 8 devices pass
--config.batch.identities=48 (or 40). On bfloat16-capable hardware, --config.model.dtype=bfloat16
roughly halves the step time.

Data: the CASIA-WebFace folder (one folder per person) with faces aligned and cropped to 182 px
with a 44 px margin (davidsandberg/facenet's `align_dataset_mtcnn.py --image_size 182
--margin 44`); the central 160/182 is kept (center_crop) and resized to 160 px.

        python -m facenet_jax.train --config experiments/casia_webface.py --workdir runs/casia \
            --config.data.root=/data/casia_webface_182 --config.data.cache_dir=/scratch/cache
        python -m facenet_jax.evaluate --workdir runs/casia --data_root /data/lfw_182 \
            --pairs /data/lfw/pairs.txt --output runs/casia/eval_lfw.json

insightface's CASIA-WebFace pack (faces_webface_112x112: train.rec, train.idx, property) is a
different variant: 112 px crops aligned by 5 landmarks, not this recipe's 182 px box crops, so
the recipe's crop size and alignment change with it (a separate run, not comparable with the
one above):

        python -m facenet_jax.train --config experiments/casia_webface.py --workdir runs/casia112 \
            --config.data.source=rec --config.data.root=/data/faces_webface_112x112 \
            --config.data.image_size=112 --config.data.center_crop=1.0 \
            --config.data.alignment=landmarks --config.data.augment.crop_padding=4
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "default.py"))["get_config"]()
    config.num_steps = 200_000
    config.log_every = 100
    config.eval_every = 5_000
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
    config.loss.strategy = "semihard_facenet"
    config.loss.margin = 0.2
    config.loss.distance = "squared"
    config.model.name = "inception_resnet_v1"
    config.model.embedding_dim = 128
    opt = config.optimizer
    opt.name = "adagrad"
    opt.learning_rate = 0.05
    opt.schedule = "piecewise"
    opt.warmup_steps = 0
    opt.decay_boundaries = (0.6, 0.85)
    opt.decay_factor = 0.1
    config.eval.batch_size = 720
    return config
