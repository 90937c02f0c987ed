"""Fine-tune the published VGGFace2 FaceNet model (imported) on your own aligned faces.

Reproduces: nothing published; the field's usual last step, a public FaceNet model adapted to
your identities with triplets. Start: davidsandberg/facenet's 20180402-114759 Inception-ResNet-v1
(VGGFace2; LFW 99.65 % by its publisher, not measured here) as redistributed by facenet-pytorch
(`20180402-114759-vggface2.pt`), imported with `python -m facenet_jax.pretrained`. Data: a
folder root/<identity>/<image> of faces aligned FaceNet-style (MTCNN box + 32 px margin, 160 px:
`python -m facenet_jax.align --mode box`), the crops these weights were trained on. Encoder
inception_resnet_v1 with affine BNs (bn_scale), 512-d, input_norm fixed_standardization, all
as the imported run's config.json says (init_from refuses a config that would compute something
else). `semihard` mining, α = 0.2 on squared distance (FaceNet's), P×K = 16×4, Adam 1e-4 with the
backbone at a tenth of it (optimizer.backbone_lr_multiplier = 0.1; 0 freezes it and its BN
statistics and trains the 1792→512 head alone). Validation is evaluated at step 0 (the imported
model as it comes) and every eval_every steps, so the gain from fine-tuning is read off
metrics.jsonl.
Hardware: an accelerator (Inception-ResNet-v1 at 160 px, batch 64: a CPU manages a few steps per
minute); measure the step time with benchmarks/train_step.py before sizing num_steps.

        python -m facenet_jax.align RAW_PHOTOS ALIGNED --mode box --image_size 160 --margin 32
        python -m facenet_jax.pretrained --source facenet-pytorch \
            --weights 20180402-114759-vggface2.pt --workdir runs/vggface2_imported
        python -m facenet_jax.train --config experiments/finetune_facenet.py \
            --workdir runs/finetune --config.data.root=ALIGNED \
            --config.model.init_from=runs/vggface2_imported

See docs/reproducing_facenet.md for the whole path and the LFW evaluation.
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "default.py"))["get_config"]()
    config.num_steps = 2000
    config.log_every = 20
    config.eval_every = 250
    config.checkpoint_every = 250
    data = config.data
    data.source = "folder"
    data.image_size = 160
    data.alignment = "box"
    data.augment.crop_padding = 8
    data.split.train, data.split.validation, data.split.test = 0.8, 0.1, 0.1
    config.batch.identities = 16
    config.batch.images_per_identity = 4
    model = config.model
    model.name = "inception_resnet_v1"
    model.embedding_dim = 512
    model.bn_scale = True
    model.input_norm = "fixed_standardization"
    opt = config.optimizer
    opt.name = "adam"
    opt.learning_rate = 1e-4
    opt.warmup_steps = 50
    opt.backbone_lr_multiplier = 0.1
    config.eval.batch_size = 128
    return config
