"""AT&T (ORL) faces from their folder: 40 people × 10 images, small pose and expression changes.

Reproduces: nothing published; a real-face check on the CPU that the embedding beats raw pixels
on unseen people. Identities split 24 train / 4 validation / 12 test (fractions 0.6/0.1/0.3,
so the 10-fold test pairs come from 12 people). Images are 92×112 grayscale: the central 92×92
square (center_crop=1.0) resized to 48 px. P×K = 8×5 (ORL has 10 images per person; P = 8
keeps whole identities per device on 1, 2, 4 or 8 devices). `semihard` mining, α = 0.2 on
squared distance (FaceNet's pairing).
Hardware: a 2-core CPU. Time: see docs/experiments.md's measured figure (a few minutes, compile
included).

        python -m facenet_jax.train --config experiments/orl.py --workdir runs/orl
        python -m facenet_jax.evaluate --baseline pixels --config experiments/orl.py \
            --output runs/orl/eval_pixels.json

data.root defaults to ../shared/data/orl_faces (beside the repository) when that folder exists;
elsewhere pass --config.data.root=/path/to/orl_faces (one folder per person: s1 … s40).
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent
_SHARED_ROOT = _HERE.parent.parent / "shared" / "data" / "orl_faces"


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "default.py"))["get_config"]()
    config.num_steps = 600
    config.log_every = 25
    config.eval_every = 200
    config.checkpoint_every = 200
    data = config.data
    data.source = "folder"
    if _SHARED_ROOT.is_dir():
        data.root = str(_SHARED_ROOT)
    data.image_size = 48
    data.center_crop = 1.0
    data.split.train, data.split.validation, data.split.test = 0.6, 0.1, 0.3
    data.pairs.pairs_per_fold = 54  # all 540 same pairs of the 12 test people, 10 folds
    data.augment.crop_padding = 3
    config.batch.identities = 8
    config.batch.images_per_identity = 5
    config.optimizer.warmup_steps = 50
    return config
