"""The tfds adapter, on a tiny builder prepared offline in the test (TensorFlow optional)."""

import sys
import time

import numpy as np
import pytest

from facenet_jax import data


@pytest.fixture(scope="module")
def tiny_faces():
    """Registers tfds' builder "tiny_faces" (6 images of 3 identities; labels are names, Text,
    like tfds' lfw) and returns its class. TensorFlow loads here, not when the file is
    collected."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed "
                               "(pip install '.[tfds]'); CI installs it")
    pytest.importorskip("tensorflow", reason="tfds needs TensorFlow to read prepared data")

    class TinyFaces(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(12, 10, 3)),
                "label": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                image = np.full((12, 10, 3), 40 * i, np.uint8)
                yield i, {"image": image, "label": f"person_{i % 3}"}

    return TinyFaces


@pytest.mark.slow
def test_reads_a_prepared_builder(tmp_path, tiny_faces):
    tiny_faces(data_dir=str(tmp_path)).download_and_prepare()
    ds = data.load_tfds("tiny_faces", split="train", image_size=8, data_dir=str(tmp_path))
    assert ds.identity_names == ["person_0", "person_1", "person_2"]
    assert ds.images.shape == (6, 8, 8, 3) and ds.images.dtype == np.uint8
    assert sorted(ds.counts()) == [2, 2, 2]
    for image, label in zip(ds.images, ds.labels):  # image value 40*i goes with person_{i%3}
        assert int(image[0, 0, 0]) // 40 % 3 == label


@pytest.mark.slow
def test_unprepared_dataset_fails_fast_with_instructions(tmp_path, tiny_faces):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="tfds build tiny_faces"):
        data.load_tfds("tiny_faces", image_size=8, data_dir=str(tmp_path / "empty"))
    assert time.perf_counter() - start < 30  # no download retries
    with pytest.raises(ValueError, match="unknown tfds dataset"):
        data.load_tfds("no_such_dataset_xyz", image_size=8, data_dir=str(tmp_path))


def test_missing_tensorflow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install '\.\[tfds\]'"):
        data.load_tfds("tiny_faces", image_size=8)
