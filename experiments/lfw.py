"""LFW as LFW distributes it (lfw.tgz or lfw-deepfunneled.tgz): 250×250 JPEGs, face centred.

Reproduces: nothing published; the project's measured recipe for LFW's official pairs on a
2-core CPU (docs/lfw_recipe.md; each ingredient as an ablation row, cross-validated over the
folds of a pairs file: experiments/results/lfw_recipe/README.md). The face fills roughly the central 110 px of each 250×250 image (LFW's
Viola-Jones box enlarged 2.2×), so the central half (center_crop=0.5, 125 px) is kept and
resized to 64 px. Identities with at least 2 images are used for training; with
data.split.exclude_pairs_file set, every identity named in that pairs file moves from training
to the test split, so the official pairs are never trained on (and are the run's test split:
this config keeps no other test people, so a run without the pairs file stops and asks for
data.split.test). 15 % of the training people are a validation split: the threshold is chosen
on its 420 pairs. P×K = 32×4, `semihard` on squared distance with α = 0.2; small_cnn with
widths 32–256 (4 stages, one conv each) at 64 px; 3,500 steps; embeddings of the image and its
mirror added at evaluation (eval.flip).
Measured: 5-fold cross-validation on lfw_half (LFW less the people of View 2 folds 6-10) gives
0.832 ± 0.019 mean accuracy, AUC 0.922 (experiments/results/lfw_recipe/README.md, row 3; 0.90 is not
reached, and that page says what limits it).
Hardware: a 2-core CPU. Time: about 15 minutes per run (869 ± 15 s per fold measured on the
idle CPU: 0.25 s per step, data decoding, compile and evaluations included).

        python -m facenet_jax.train --config experiments/lfw.py --workdir runs/lfw \
            --config.data.root=/data/lfw \
            --config.data.split.exclude_pairs_file=/data/lfw/pairs.txt
        python -m facenet_jax.evaluate --workdir runs/lfw --data_root /data/lfw \
            --pairs /data/lfw/pairs.txt --output runs/lfw/eval_lfw_pairs.json

The second command scores the trained encoder on the official 10-fold view-2 pairs.txt (6,000
pairs; every image of the folder is loaded, single-image identities included). data.root
defaults to ../shared/data/lfw_half (beside the repository: LFW less the people of View 2's
folds 6-10, see that folder's README) when that folder exists; there the protocol is one
command: python -m facenet_jax.crossval --config experiments/lfw.py
--pairs ../shared/data/lfw_half_pairs.txt --workdir runs/lfw_cv.
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent
_SHARED_ROOT = _HERE.parent.parent / "shared" / "data" / "lfw_half"


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "default.py"))["get_config"]()
    config.num_steps = 3500
    config.log_every = 50
    config.eval_every = 700
    config.checkpoint_every = 700
    data = config.data
    data.source = "folder"
    if _SHARED_ROOT.is_dir():
        data.root = str(_SHARED_ROOT)
    data.image_size = 64
    data.center_crop = 0.5
    data.min_images_per_identity = 2
    # The test people are the pairs file's (data.split.exclude_pairs_file); a larger
    # validation split gives the threshold 420 pairs of 100 people rather than 60 of 35.
    data.split.train, data.split.validation, data.split.test = 0.85, 0.15, 0.0
    data.augment.crop_padding = 4
    config.batch.identities = 32
    config.batch.images_per_identity = 4
    config.model.small_cnn.widths = (32, 64, 128, 256)
    config.eval.flip = True
    return config
