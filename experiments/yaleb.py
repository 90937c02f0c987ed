"""Extended Yale Face Database B (cropped) from its folder: 38 people × ~64 images, fixed pose,
lighting from nearly frontal to nearly black.

Reproduces: nothing published; the hard real-face check on the CPU (lighting changes a face's
pixels more than identity does, so raw pixels do poorly; see the pixel baseline). Identities
split 23 train / 4 validation / 11 test (fractions 0.6/0.1/0.3). Images are 84×96 grayscale:
the central 84×84 square (center_crop=1.0) resized to 48 px. P×K = 16×8 (128 images; P = 16
keeps whole identities per device on 1, 2, 4, 8 or 16 devices). `semihard` mining, α = 0.2 on
squared distance.
Hardware: a 2-core CPU. Time: see docs/experiments.md's measured figure.

        python -m facenet_jax.train --config experiments/yaleb.py --workdir runs/yaleb
        python -m facenet_jax.evaluate --baseline pixels --config experiments/yaleb.py \
            --output runs/yaleb/eval_pixels.json

data.root defaults to ../shared/data/extended_yaleb (beside the repository) when that folder
exists; elsewhere pass --config.data.root=/path/to/CroppedYale (one folder per person).
"""

import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent
_SHARED_ROOT = _HERE.parent.parent / "shared" / "data" / "extended_yaleb"


def get_config() -> ml_collections.ConfigDict:
    config = runpy.run_path(str(_HERE / "default.py"))["get_config"]()
    config.num_steps = 800
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
    config.batch.identities = 16
    config.batch.images_per_identity = 8
    return config
