"""LFW as LFW distributes it (lfw.tgz or lfw-deepfunneled.tgz): 250×250 JPEGs, face centred.

Reproduces: nothing published; what a user with LFW on a laptop runs, and the LFW protocol
check of the evaluation. The face fills roughly the central 110 px of each 250×250 image (LFW's
Viola-Jones box enlarged 2.2×), so the central half (center_crop=0.5, 125 px) is kept and
resized to 64 px. Identities with at least 2 images are used for training (1,680 of 5,749);
with data.split.exclude_pairs_file set, every identity named in that pairs file moves from
training to the test split, so the official pairs are never trained on. P×K = 32×4, `semihard`
on squared distance with α = 0.2, small_cnn (4 stages) at 64 px.
Hardware: a 2-core CPU. Time: about 15 minutes. Sized from a measured step: this model, 64 px,
P×K = 32×4, semihard, one CPU device took 0.23 s per step on this project's 2-core CPU (shared
with other jobs; compile 7 s), so 3,500 steps ≈ 13.5 min, plus data loading (the first run
decodes the 13,233 JPEGs into the cache once), compile and evaluation.

        python -m facenet_jax.train --config experiments/lfw.py --workdir runs/lfw \
            --config.data.root=/data/lfw \
            --config.data.split.exclude_pairs_file=/data/lfw/pairs.txt
        python -m facenet_jax.evaluate --workdir runs/lfw --data_root /data/lfw \
            --pairs /data/lfw/pairs.txt --output runs/lfw/eval_lfw_pairs.json

The second command scores the trained encoder on the official 10-fold view-2 pairs.txt (6,000
pairs; every image of the folder is loaded, single-image identities included). data.root
defaults to ../shared/data/lfw_half (beside the repository: LFW less the people of View 2's
folds 6-10, see that folder's README) when that folder exists.
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
    data.split.train, data.split.validation, data.split.test = 0.9, 0.05, 0.05
    data.augment.crop_padding = 4
    config.batch.identities = 32
    config.batch.images_per_identity = 4
    return config
