"""The same LFW photos as a folder + pairs file and as a .bin, scored with raw-pixel embeddings
under an lfw.py-like preprocessing (center_crop 0.5, 64 px): AUC is fold-free, so the two paths
must agree exactly once the .bin takes the run's crop."""
import pathlib
import pickle
import sys
import tempfile

import numpy as np

from facenet_jax import data
from facenet_jax.eval import metrics, verification_sets
from facenet_jax.eval.evaluate import pixel_embeddings

root = pathlib.Path(sys.argv[1])
pairs_file = pathlib.Path(sys.argv[2])
folder = data.load_image_folder(root, 64, center_crop=0.5, min_images_per_identity=1,
                                cache_dir=tempfile.mkdtemp())
pairs = data.read_pairs(pairs_file, folder)
rows = np.stack([pairs.first, pairs.second], axis=1).ravel()
with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "lfw_photos.bin"
    path.write_bytes(pickle.dumps(([pathlib.Path(folder.paths[i]).read_bytes() for i in rows],
                                   pairs.is_same.tolist()), protocol=2))
    emb = pixel_embeddings(np.asarray(folder.images))
    d = metrics.pair_distances(emb, pairs.first, pairs.second, "squared")
    print(f"folder + pairs ({len(pairs)} pairs): AUC {metrics.roc_auc(d, pairs.is_same):.4f}")
    for crop, label in ((None, "before (no crop)"), (0.5, "after (the run's crop)")):
        vset = verification_sets.read_bin(path, 64, crop)
        result = verification_sets.evaluate_set(pixel_embeddings, vset, distance="squared")
        print(f".bin {label}: AUC {result['auc']:.4f}, accuracy {result['accuracy']:.4f}, "
              f"VAL@FAR=1e-3 {result['val@far=1e-3']:.4f} "
              f"(resolved: {result['val@far=1e-3_resolved']}, FAR {result['far@far=1e-3']:.4f})")
