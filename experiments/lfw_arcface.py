"""LFW with ArcFace instead of triplets: experiments/lfw.py's data, encoder, batch size and step
budget, trained as classification over the training identities.

Reproduces: the margin-softmax side of the triplet-against-softmax comparison on LFW-style data
(a few thousand identities, most with 2–5 images, a few with hundreds), at laptop scale:
ArcFace (Deng et al., CVPR 2019) at the paper's s = 64 and m = 0.5 over the training identities
of lfw.py's split (identities with ≥ 2 images; 85 % train: ~1,430 on full LFW, ~570 per fold
of lfw_half), on the uniform sampler (every training image once per epoch, batches of 128, so
the many 2-image people are seen as often as their images allow and the few large ones do not
dominate the way P×K sampling would not let them either), lfw.py's small_cnn (widths 32–256)
at 64 px from the central half of each 250×250 image, Adam 3e-3 with lfw.py's cosine schedule
and 3,500 steps. Everything else (split, exclude_pairs_file, the evaluation) is lfw.py's, so
the two runs' numbers compare directly.
What to expect on such data: few images per class make the head's centres noisy; if the
training accuracy stays near 0 after the warm-up, lower the scale
(--config.loss.classification.scale=32) or the margin (0.3), or use the two-stage recipe
(classification, then triplet fine-tuning with model.init_from) of
docs/classification_baselines.md. Choose on the validation split (eval_validation.json), not
the test pairs.
Hardware: a 2-core CPU. Time: about lfw.py's (15 minutes): the same encoder, image size, batch
and steps; the head adds one [128, 128] × [128, ~1,430] product per step. Not run here in full.

        python -m facenet_jax.train --config experiments/lfw_arcface.py \
            --workdir runs/lfw_arcface --config.data.root=/data/lfw \
            --config.data.split.exclude_pairs_file=/data/lfw/pairs.txt
        python -m facenet_jax.evaluate --workdir runs/lfw_arcface --data_root /data/lfw \
            --pairs /data/lfw/pairs.txt --output runs/lfw_arcface/eval_lfw_pairs.json

data.root defaults to ../shared/data/lfw_half when that folder exists, as in lfw.py. Every key
lives in default.py (which lfw.py extends).
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "lfw.py"))["get_config"]()
    config.loss.kind = "classification"
    config.loss.classification.head = "arcface"  # s, m unset: the paper's 64 and 0.5
    config.data.sampler = "uniform"  # batch.identities × images_per_identity = 128 images
    return config
