"""Embeddings of an imported davidsandberg graph against TensorFlow executing the same graph.

    python experiments/results/reproduce_facenet/tf_parity.py ALIGNED_FOLDER RUN_DIR GRAPH.pb

ALIGNED_FOLDER: face crops at the run's image size (e.g. `python -m facenet_jax.align ... --mode
box --image_size 160 --margin 32`); RUN_DIR: written by `python -m facenet_jax.pretrained
--source facenet-tf --weights GRAPH.pb`. TensorFlow runs image by image (20180408-102900's input
placeholder is [1, 160, 160, 3]) on davidsandberg's fixed standardisation, (x - 127.5) / 128.
Needs the pretrained-tf extra.
"""

import pathlib
import sys

import numpy as np


def main(aligned: str, run: str, graph_path: str) -> None:
    import tensorflow as tf

    from facenet_jax import data
    from facenet_jax.eval.embed import load_encoder

    encoder = load_encoder(run, flip=False)
    faces = data.load_folder_as_configured(aligned, encoder.config.data,
                                           min_images_per_identity=1)
    ours = encoder.embed(faces.images)
    graph_def = tf.compat.v1.GraphDef.FromString(pathlib.Path(graph_path).read_bytes())
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            theirs = np.concatenate([
                session.run("embeddings:0",
                            {"input:0": (image[None].astype(np.float32) - 127.5) / 128.0})
                for image in faces.images])
    difference = np.abs(ours - theirs)
    print(f"{len(faces.images)} crops: max |ours - TF| = {difference.max():.2e}, mean "
          f"{difference.mean():.2e}, max 1 - cos = {(1 - np.sum(ours * theirs, 1)).max():.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
