"""ArcFace at scale: IR-ResNet-50 + ArcFace on MS1MV2 (or CASIA-WebFace, VGGFace2, any folder of
112×112 landmark-aligned faces), the published recipe, on accelerators.

Reproduces: ArcFace (Deng, Guo, Xue, Zafeiriou, CVPR 2019), the ResNet-50 row: insightface's
IR-ResNet-50 (BN-conv-BN-PReLU-conv-BN blocks, BN-dropout-FC-BN output, 512-d embedding) on
112×112 crops aligned by 5 landmarks to ArcFace's reference points (data.alignment="landmarks";
`python -m facenet_jax.align` makes them from raw photos), ArcFace logits with s = 64, m = 0.5
over every training identity (MS1MV2: 85,742 people, 5.8M images), images drawn uniformly
without replacement each epoch (data.sampler="uniform"), random horizontal flip as the only
augmentation; SGD with momentum 0.9 and weight decay 5e-4, learning rate 0.1 at a global batch
of 512, divided by 10 at 100K and 160K steps, ending at 180K (the paper's MS1MV2 schedule: about
16 epochs), no warm-up. The paper reports LFW 99.83%, CFP-FP 98.27% and AgeDB-30 98.28% for
ResNet-100; ResNet-50 lands a little below. insightface's arcface_torch trains the same model
with 128 per GPU × 8 GPUs = 1,024, lr 0.1, 20 epochs and a polynomial decay (its ms1mv2_r50
config: weight decay 1e-4, fp16): that variant is --config.batch.identities=256
--config.num_steps=113700 --config.optimizer.weight_decay=1e-4, with this project's piecewise
schedule in place of the polynomial one. For CASIA-WebFace (10,575 people, 0.49M images) the
paper divides at 20K and 28K of 32K steps: --config.num_steps=32000 (the boundaries are
fractions: 0.625, 0.875).

Hardware: accelerators (8 GPUs/TPU cores: 64 images each). Not measured here (this project's
CPU machine cannot run it); time one step on your hardware with
        python benchmarks/train_step.py --models iresnet50 --batches 128x4 --devices 8
and multiply by num_steps. The class centres (85,742 × 512 floats, 176 MB, plus the optimizer's
momentum) are sharded over the devices along the classes; loss.classification.sample_fraction
< 1 turns on Partial FC for larger identity counts. --config.model.dtype=bfloat16 roughly halves
the step time where supported (the paper trained in fp32, arcface_torch in fp16).

Data: insightface's MS1MV2 pack as it is downloaded (the folder holding train.rec, train.idx
and property; data.source="rec", read natively, no mxnet, images decoded as batches read them:
no cache). Evaluate on the insightface .bin sets shipped beside it with eval.verification_sets
(docs/benchmarks_evaluation.md).

        python -m facenet_jax.train --config experiments/ms1mv2_arcface.py --workdir runs/ms1mv2 \
            --config.data.root=/data/faces_emore --config.eval.verification_sets=/data/faces_emore

A folder of 112×112 aligned crops instead (one folder per person; decoded once into a
memory-mapped uint8 cache, ~220 GB for MS1MV2, under data.cache_dir):
--config.data.source=folder --config.data.root=/data/ms1mv2_112
--config.data.cache_dir=/scratch/cache.
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "default.py"))["get_config"]()
    config.num_steps = 180_000
    config.log_every = 100
    config.eval_every = 10_000
    config.checkpoint_every = 5_000
    data = config.data
    data.source = "rec"  # pass --config.data.root=PACK_DIR (train.rec, train.idx, property)
    data.image_size = 112
    data.alignment = "landmarks"
    data.sampler = "uniform"
    # Held-out identities for the end-of-run evaluation (~430 people each); the benchmarks are
    # the .bin sets.
    data.split.train, data.split.validation, data.split.test = 0.99, 0.005, 0.005
    data.augment.crop_padding = 0  # flip only, as the paper and arcface_torch
    data.augment.flip = True
    data.prefetch = 8
    # The uniform sampler reads P × K as the global batch size only: 128 × 4 = 512.
    config.batch.identities = 128
    config.batch.images_per_identity = 4
    loss = config.loss
    loss.kind = "classification"
    loss.classification.head = "arcface"
    loss.classification.scale = 64.0
    loss.classification.margin = 0.5
    loss.classification.sample_fraction = 1.0
    config.model.name = "iresnet50"
    config.model.embedding_dim = 512
    config.model.input_norm = "symmetric"  # (x - 127.5) / 127.5, as insightface
    opt = config.optimizer
    opt.name = "sgd"
    opt.learning_rate = 0.1
    opt.momentum = 0.9
    opt.weight_decay = 5e-4
    opt.schedule = "piecewise"
    opt.decay_boundaries = (100_000 / 180_000, 160_000 / 180_000)
    opt.decay_factor = 0.1
    opt.warmup_steps = 0
    opt.grad_clip_norm = 5.0  # arcface_torch clips the backbone's gradient norm at 5
    config.eval.batch_size = 512
    config.eval.flip = True  # insightface's verification adds the flipped image's embedding
    return config
