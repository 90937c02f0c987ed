"""insightface RecordIO packs: the byte format (checked against bytes worked out by hand from
dmlc-core's src/recordio.cc and mxnet's python/mxnet/recordio.py), the identity index with and
without identity records, corrupt packs, unreadable images, the converter, and training."""

import io
import json
import logging
import os
import struct

import ml_collections
import numpy as np
import pytest

from facenet_jax import data
from facenet_jax.data import rec, recordio
from facenet_jax.data.pairs import image_numbers

MAGIC_LE = bytes([0x0A, 0x23, 0xD7, 0xCE])  # 0xced7230a as the little-endian uint32 on disk


# -- the framing, byte for byte ---------------------------------------------------------------

def test_a_short_record_is_one_frame_padded_to_4_bytes():
    # magic, lrec = cflag 0 << 29 | length 3, the 3 bytes, one zero byte of padding.
    assert recordio.frame(b"abc") == MAGIC_LE + bytes([3, 0, 0, 0]) + b"abc" + b"\0"
    assert recordio.frame(b"abcd") == MAGIC_LE + bytes([4, 0, 0, 0]) + b"abcd"
    assert recordio.frame(b"") == MAGIC_LE + bytes(4)


def test_a_payload_holding_the_magic_at_an_aligned_offset_splits_into_flagged_parts():
    payload = b"ABCD" + MAGIC_LE + b"EFGHI"
    expected = (MAGIC_LE + bytes([4, 0, 0, 0x20]) + b"ABCD"      # cflag 1: 1 << 29 | 4
                + MAGIC_LE + bytes([5, 0, 0, 0x60]) + b"EFGHI"   # cflag 3: 3 << 29 | 5
                + bytes(3))                                       # padding of the whole record
    assert recordio.frame(payload) == expected
    # Magic first, then twice in a row: empty parts flagged 1, 2, 3.
    assert recordio.frame(MAGIC_LE + MAGIC_LE) == (MAGIC_LE + bytes([0, 0, 0, 0x20])
                                                   + MAGIC_LE + bytes([0, 0, 0, 0x40])
                                                   + MAGIC_LE + bytes([0, 0, 0, 0x60]))
    # Not 4-aligned, or cut by the end: not split (the writer only tests i < len & ~3).
    unaligned = b"A" + MAGIC_LE + b"BCD"
    assert recordio.frame(unaligned) == MAGIC_LE + bytes([8, 0, 0, 0]) + unaligned
    assert recordio.frame(b"AB" + MAGIC_LE[:2]) == MAGIC_LE + bytes([4, 0, 0, 0]) + b"AB" + \
        MAGIC_LE[:2]


def test_the_record_header_is_mxnets_IfQQ():
    # flag 0, label 3.0 (0x40400000), id 7, id2 9: 24 bytes, little-endian.
    assert recordio.pack_record(3.0, b"xy", id=7, id2=9) == (
        bytes(4) + bytes([0, 0, 0x40, 0x40]) + bytes([7]) + bytes(7) + bytes([9]) + bytes(7)
        + b"xy")
    # A label vector: flag = its length, label field 0, float32 entries after the header.
    packed = recordio.pack_record([1.0, 2.0], id=1)
    assert packed == (bytes([2, 0, 0, 0]) + bytes(4) + bytes([1]) + bytes(15)
                      + bytes([0, 0, 0x80, 0x3F]) + bytes([0, 0, 0, 0x40]))
    header, payload = recordio.unpack_record(packed + b"jpeg")
    assert header.flag == 2 and list(header.label) == [1.0, 2.0] and header.class_label == 1.0
    assert payload == b"jpeg" and header.id == 1
    header, payload = recordio.unpack_record(recordio.pack_record(5.0, b"z", id=3))
    assert (header.flag, header.label, header.id, header.id2, payload) == (0, 5.0, 3, 0, b"z")
    with pytest.raises(recordio.RecordIOError, match="announces 3 labels"):
        recordio.unpack_record(struct.pack("<IfQQ", 3, 0, 0, 0) + bytes(8))


def _write_records(path, payloads):
    with recordio.PackWriter(path.with_suffix(".rec"), path.with_suffix(".idx")) as writer:
        for i, payload in enumerate(payloads):
            writer.write(i, payload)
    return recordio.RecordFile(path.with_suffix(".rec")), recordio.read_index(
        path.with_suffix(".idx"))


def test_records_read_back_whole_with_the_magic_put_back(tmp_path):
    payloads = [b"abc", b"ABCD" + MAGIC_LE + b"EFGHI", MAGIC_LE * 3, b"", b"x" * 1001,
                recordio.pack_record([7.0, 9.0], MAGIC_LE + b"tail")]
    records, (ids, offsets) = _write_records(tmp_path / "t", payloads)
    assert ids.tolist() == list(range(len(payloads)))
    # Offsets are where each record's first frame starts: 12 = 8 + "abc" padded to 4.
    assert offsets.tolist()[:3] == [0, 12, 12 + 28]
    assert [records.read(o) for o in offsets] == payloads
    assert records.read_header(offsets[5]).label.tolist() == [7.0, 9.0]
    records.check_record_starts(offsets)


def test_a_corrupt_frame_or_a_stray_offset_is_an_error_naming_file_and_offset(tmp_path):
    records, (_, offsets) = _write_records(tmp_path / "t", [b"abc", b"ABCD" + MAGIC_LE + b"E",
                                                            b"last"])
    path = str(records.path)
    for offset, message in ((4, "no RecordIO magic at offset 4"),
                            (offsets[1] + 12, "inside a record"),  # the 2nd part's frame
                            (2, "not a 4-aligned frame start"),
                            (10_000, "not a 4-aligned frame start")):
        with pytest.raises(recordio.RecordIOError, match=message) as error:
            records.read(offset)
        assert path in str(error.value)
        with pytest.raises(recordio.RecordIOError, match=path):
            records.check_record_starts(np.array([0, offset]))
    # A truncated file: the last frame runs past its end.
    data_ = records.path.read_bytes()
    records.close()
    records.path.write_bytes(data_[:-2])
    with pytest.raises(recordio.RecordIOError, match=f"offset {offsets[2]}.*past the end"):
        recordio.RecordFile(records.path).read(offsets[2])
    # A broken continuation: the 2nd part of record 1 relabelled as a fresh record.
    broken = bytearray(data_)
    broken[offsets[1] + 12 + 7] = 0  # lrec's top byte: cflag 3 → 0
    records.path.write_bytes(bytes(broken))
    with pytest.raises(recordio.RecordIOError, match="expected a continuation"):
        recordio.RecordFile(records.path).read(offsets[1])


def test_index_lines_must_be_id_tab_offset(tmp_path):
    (tmp_path / "a.idx").write_text("0\t0\n1 8\n")
    with pytest.raises(recordio.RecordIOError, match="line 2"):
        recordio.read_index(tmp_path / "a.idx")
    (tmp_path / "b.idx").write_text("0\t0\n0\t8\n")
    with pytest.raises(recordio.RecordIOError, match="listed twice"):
        recordio.read_index(tmp_path / "b.idx")


# -- packs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faces():
    return data.load_synthetic(num_identities=5, images_per_identity=4, image_size=32, seed=3)


def _jpeg_round_trip(image):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(rec.encode_jpeg(image))).convert("RGB"))


def _pack(root, faces, identity_records=True, labels=None, payloads=None):
    labels = faces.labels if labels is None else labels
    payloads = payloads or [rec.encode_jpeg(image) for image in faces.images]
    rec.write_pack(root, payloads, labels, image_size=32, identity_records=identity_records)
    return root


def test_insightface_layout_record_by_record(tmp_path, faces):
    """Record 0: label [N+1, N+1+C]; images 1..N (label = identity); identity records
    N+1..N+C with [first, last); property 'C,H,W' (insightface's face2rec layout)."""
    root = _pack(tmp_path / "pack", faces)
    records = recordio.RecordFile(root / "train.rec")
    ids, offsets = recordio.read_index(root / "train.idx")
    offset_of = dict(zip(ids.tolist(), offsets.tolist()))
    assert sorted(offset_of) == list(range(1 + 20 + 5))
    assert records.read_header(offset_of[0]).label.tolist() == [21.0, 26.0]
    assert records.read_header(offset_of[22]).label.tolist() == [5.0, 9.0]  # identity 1
    header, payload = recordio.unpack_record(records.read(offset_of[5]))
    assert (header.flag, header.label, header.id) == (0, 1.0, 5) and payload[:2] == b"\xff\xd8"
    assert (root / "property").read_text().strip() == "5,32,32"


@pytest.mark.parametrize("identity_records", [True, False])
def test_a_pack_loads_as_a_dataset_decoded_on_access(tmp_path, faces, identity_records):
    root = _pack(tmp_path / "pack", faces, identity_records)
    dataset = rec.load_pack(root, image_size=32)
    assert dataset.identity_names == [f"{k:07d}" for k in range(5)]
    assert dataset.labels.tolist() == faces.labels.tolist() and dataset.paths is None
    assert isinstance(dataset.images, rec.PackImages) and dataset.images.shape == (20, 32, 32, 3)
    expected = _jpeg_round_trip(faces.images[6])
    np.testing.assert_array_equal(dataset.images[6], expected)
    np.testing.assert_array_equal(dataset.images[[6, 6]][1], expected)
    np.testing.assert_array_equal(dataset.images[4:8][2], expected)
    assert np.abs(np.asarray(dataset.images, np.float32) - faces.images).mean() < 8  # JPEG
    # Names and image numbers are what `folder` would give a folder 0000001/1.jpg ...
    assert image_numbers(dataset).tolist() == [1, 2, 3, 4] * 5
    # Subsets stay lazy.
    test = dataset.subset([3, 1])
    assert isinstance(test.images, data.RowSubset) and test.identity_names == ["0000003",
                                                                                 "0000001"]
    np.testing.assert_array_equal(test.images[2], expected)  # dataset order: identity 1 first


def test_a_pack_without_identity_records_indexes_by_labels_and_caches_it(tmp_path, faces,
                                                                         monkeypatch):
    # Labels out of order in the file (identity 2's images first), not starting at 0.
    labels = np.array([12] * 4 + [10] * 4 + [11] * 4 + [13] * 4 + [14] * 4)
    root = tmp_path / "pack"
    order = np.argsort(labels, kind="stable")
    root.mkdir()
    with recordio.PackWriter(root / "train.rec", root / "train.idx") as writer:
        for i, (image, label) in enumerate(zip(faces.images, labels)):
            writer.write(i, recordio.pack_record(float(label), rec.encode_jpeg(image), id=i))
    dataset = rec.load_pack(root, image_size=32)
    assert dataset.identity_names == [f"{k:07d}" for k in range(10, 15)]
    assert dataset.counts().tolist() == [4] * 5
    np.testing.assert_array_equal(np.asarray(dataset.images), [_jpeg_round_trip(image) for image
                                                               in faces.images[order]])
    cache = root / "train.rec.labels.npz"
    assert cache.is_file()

    reads = []
    original = recordio.RecordFile.read_header
    monkeypatch.setattr(recordio.RecordFile, "read_header",
                        lambda self, offset: reads.append(offset) or original(self, offset))
    rec.load_pack(root, image_size=32)
    assert reads == []  # the labels came from the cache
    # The pack changes (another identity for record 0's image): the cache is rebuilt.
    stat = (root / "train.rec").stat()
    with recordio.PackWriter(root / "train.rec", root / "train.idx") as writer:
        for i, (image, label) in enumerate(zip(faces.images, labels)):
            writer.write(i, recordio.pack_record(float(9 if i == 0 else label),
                                                 rec.encode_jpeg(image), id=i))
    # Same size: only the modification time tells (set apart from the first write's).
    assert (root / "train.rec").stat().st_size == stat.st_size
    os.utime(root / "train.rec", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = rec.load_pack(root, image_size=32, min_images_per_identity=1)
    assert changed.identity_names[0] == "0000009" and changed.counts()[0] == 1
    assert len(reads) == 20  # every image's header, once


def test_label_vectors_on_images_use_their_first_entry(tmp_path, faces):
    root = tmp_path / "pack"
    root.mkdir()
    with recordio.PackWriter(root / "train.rec", root / "train.idx") as writer:
        for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
            writer.write(i, recordio.pack_record([float(label), 0.5], rec.encode_jpeg(image)))
    assert rec.load_pack(root, image_size=32).counts().tolist() == [4] * 5


def test_an_unreadable_image_is_replaced_by_its_identitys_next_one(tmp_path, faces, caplog):
    payloads = [rec.encode_jpeg(image) for image in faces.images]
    payloads[5] = b"not a jpeg" + MAGIC_LE  # identity 1's 2nd image (multi-part, too)
    payloads[7] = payloads[7][:len(payloads[7]) * 2 // 3]  # identity 1's last: cut mid-scan
    root = _pack(tmp_path / "pack", faces, payloads=payloads)
    dataset = rec.load_pack(root, image_size=32)
    images = dataset.images
    with caplog.at_level(logging.WARNING):
        batch = images[[5, 7, 5, 4]]
    np.testing.assert_array_equal(batch[0], images[6])  # 5 → 6
    np.testing.assert_array_equal(batch[1], images[4])  # 7 → wraps to 4 (its identity's first)
    np.testing.assert_array_equal(batch[2], batch[0])   # deterministic
    assert images.replaced == 3  # three reads replaced; the direct reads of 6 and 4 are not
    assert f"{root / 'train.rec'}: record 6 of identity 0000001 replaced by" in caplog.text
    # The count reaches the sampler (and so the training log).
    sampler = data.PKSampler(dataset.subset([1, 0]), identities=2, images_per_identity=4,
                             seed=0)
    before = sampler.replaced_images
    sampler.batch(0)
    assert sampler.replaced_images == before + 2  # rows 5 and 7, each once
    # Every image of an identity unreadable: an error naming the pack and identity.
    for row in (8, 9, 10, 11):
        payloads[row] = b"junk"
    broken = rec.load_pack(_pack(tmp_path / "broken", faces, payloads=payloads), image_size=32)
    with pytest.raises(data.BadImageError, match="no image of identity 0000002"):
        broken.images[9]


def test_a_stray_offset_in_the_index_fails_at_load_naming_it(tmp_path, faces):
    root = _pack(tmp_path / "pack", faces)
    lines = (root / "train.idx").read_text().splitlines()
    offset = int(lines[3].split("\t")[1]) + 8
    lines[3] = f"3\t{offset}"
    (root / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(recordio.RecordIOError, match=f"train.rec.*offset {offset}"):
        rec.load_pack(root, image_size=32)


def test_missing_files_and_bad_configs_say_what_to_do(tmp_path, faces):
    with pytest.raises(FileNotFoundError, match="train.rec.*pack folder"):
        rec.load_pack(tmp_path, image_size=32)
    root = _pack(tmp_path / "pack", faces)
    config = ml_collections.ConfigDict(dict(source="rec", root=str(root), image_size=32,
                                            center_crop=None, alignment="box",
                                            min_images_per_identity=2))
    with pytest.raises(ValueError, match="'landmarks'-aligned crops but data.alignment='box'"):
        data.load_dataset(config)
    config.alignment = "landmarks"
    assert data.load_dataset(config).num_identities == 5
    config.image_size = 24  # resized as folders are
    assert data.load_dataset(config).images[0].shape == (24, 24, 3)
    config.root = None
    with pytest.raises(ValueError, match="needs data.root"):
        data.load_dataset(config)
    (root / "property").write_text("5,32\n")
    with pytest.raises(ValueError, match="classes,height,width"):
        rec.load_pack(root, image_size=32)


def test_converter_cli_writes_a_pack_and_lists_it(tmp_path, faces, capsys):
    from PIL import Image

    folder = tmp_path / "faces"
    for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
        (folder / f"person_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"person_{label}" / f"{i}.png")
    (folder / "alignment.json").write_text(json.dumps({"mode": "box"}))
    rec.main(["convert", str(folder), str(tmp_path / "pack"), "--image_size", "32"])
    assert (tmp_path / "pack" / "labels.tsv").read_text().splitlines()[1] == "0000001\tperson_1"
    assert rec.pack_alignment(tmp_path / "pack") == "box"
    capsys.readouterr()
    rec.main(["list", str(tmp_path / "pack")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("20 images of 5 identities") and out[1:] == [
        f"{k:07d}\t4" for k in range(5)]
    with pytest.raises(FileExistsError, match="exists"):  # one line, exit 2 under python -m
        rec.main(["convert", str(folder), str(tmp_path / "pack")])
    rec.main(["convert", str(folder), str(tmp_path / "flat"), "--image_size", "32",
              "--no_identity_records"])
    assert not rec.describe_pack(tmp_path / "flat")["identity_records"]


@pytest.mark.slow
def test_training_and_evaluating_on_a_pack(tmp_path):
    """--config.data.source=rec --config.data.root=PACK trains, evaluates its test split, and
    `python -m facenet_jax.evaluate` re-scores it from the pack."""
    from test_train_cli import _python_m, _train

    faces = data.load_synthetic(num_identities=40, images_per_identity=6, image_size=16, seed=0)
    payloads = [rec.encode_jpeg(image) for image in faces.images]
    payloads[1] = b"broken"
    pack = tmp_path / "pack"
    rec.write_pack(pack, payloads, faces.labels, image_size=16, identity_records=True)
    workdir = tmp_path / "run"
    _train(workdir, "--config.data.source=rec", f"--config.data.root={pack}",
           "--config.data.alignment=landmarks")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert train_rows and all(row["replaced_images"] >= 0 for row in train_rows)
    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_pairs"] > 0 and 0 <= result["accuracy"] <= 1
    _python_m("facenet_jax.evaluate", "--workdir", workdir, "--output", tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["accuracy"] == result["accuracy"] and again["num_pairs"] == result["num_pairs"]


def _jpeg_holding_the_magic(image):
    """A valid JPEG whose bytes hold the magic twice at offsets that are 4-aligned in its
    record (after the 24-byte header): a COM segment right after SOI carries them."""
    jpeg = rec.encode_jpeg(image)
    comment = b"xx" + MAGIC_LE + MAGIC_LE + b"yy"  # starts at 24 + 2 + 4: the magic at 32, 36
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment + jpeg[2:]


@pytest.mark.parametrize("identity_records", [True, False])
def test_images_whose_bytes_hold_the_magic_are_multi_part_records_read_whole(
        tmp_path, faces, identity_records):
    payloads = [rec.encode_jpeg(image) for image in faces.images]
    payloads[6] = _jpeg_holding_the_magic(faces.images[6])
    root = _pack(tmp_path / "pack", faces, identity_records, payloads=payloads)
    ids, offsets = recordio.read_index(root / "train.idx")
    record_id = 6 + (1 if identity_records else 0)
    offset = int(offsets[ids.tolist().index(record_id)])
    raw = (root / "train.rec").read_bytes()
    # Three frames flagged 1, 2, 3: 32 bytes before the first magic, none between, the rest.
    assert struct.unpack_from("<II", raw, offset) == (recordio.MAGIC, 1 << 29 | 32)
    assert struct.unpack_from("<II", raw, offset + 8 + 32) == (recordio.MAGIC, 2 << 29 | 0)
    assert struct.unpack_from("<I", raw, offset + 8 + 32 + 8 + 4)[0] >> 29 == 3
    dataset = rec.load_pack(root, image_size=32)
    assert dataset.counts().tolist() == [4] * 5  # its label read through the parts
    np.testing.assert_array_equal(dataset.images[6], _jpeg_round_trip(faces.images[6]))
    assert dataset.images.replaced == 0


def test_the_fast_jpeg_decoder_gives_pils_pixels(faces, monkeypatch):
    """simplejpeg (the stream extra) and PIL decode a pack's JPEGs to the same pixels, so a
    run's batches do not depend on which is installed."""
    pytest.importorskip("simplejpeg")
    from PIL import Image

    for image in faces.images:
        for encoded in (rec.encode_jpeg(image), rec.encode_jpeg(image, quality=60),
                        _jpeg_holding_the_magic(image)):
            pil = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
            np.testing.assert_array_equal(rec._decode_jpeg_fast(encoded), pil)
    gray_jpeg = io.BytesIO()
    Image.fromarray(faces.images[0][..., 0]).save(gray_jpeg, format="JPEG")
    pil = np.asarray(Image.open(io.BytesIO(gray_jpeg.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(rec._decode_jpeg_fast(gray_jpeg.getvalue()), pil)
    assert rec._decode_jpeg_fast(b"\x89PNG....") is None
