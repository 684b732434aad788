"""udtimm.data.base: image decoding (every format PIL reads to 8-bit RGB, 16-bit and other modes converted as
docs/datasets.md#image-files says, unreadable files named in one line) and the held-out part of a split."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from udtimm.data.base import (
    LABELS_DTYPE,
    CorruptImageError,
    DatasetError,
    Label,
    MultiLabelDataset,
    Sample,
    SampleTable,
    drop_labels,
    hold_out,
    label_counts,
    labels_from_dense,
    make_labels,
    pil_pixels,
    read_image,
    unknown_only_classes,
)

# 16-bit values and their high bytes (v >> 8), worked out by hand: 256 is 0x0100, 32767 is 0x7FFF, 4095 is 0x0FFF.
SIXTEEN_BIT = [0, 255, 256, 1000, 4095, 32767, 32768, 65280, 65535]
HIGH_BYTES = [0, 0, 1, 3, 15, 127, 128, 255, 255]


def gray_channels(image: torch.Tensor) -> list[int]:
    """The one row of a [3, 1, W] image, checked to be gray (three equal channels)."""
    assert image.dtype == torch.uint8 and image.shape[:2] == (3, 1)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    return image[0, 0].tolist()


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tif", "gray16.pgm"])
def test_sixteen_bit_grayscale_keeps_the_high_byte(tmp_path, name: str) -> None:
    path = tmp_path / name
    Image.fromarray(np.array([SIXTEEN_BIT], dtype=np.uint16)).save(path)  # PNG: torchvision; TIFF, PGM: PIL
    assert gray_channels(read_image(str(path))) == HIGH_BYTES


def test_bmp_and_tiff_decode_to_their_exact_pixels(tmp_path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    for name in ("rgb.bmp", "rgb.tif", "rgb.ppm", "rgb.tga"):
        Image.fromarray(pixels).save(tmp_path / name)  # lossless formats: the pixels come back exactly
        assert torch.equal(read_image(str(tmp_path / name)), torch.from_numpy(pixels).permute(2, 0, 1)), name


def test_modes_without_a_pil_rgb_conversion_of_their_range() -> None:
    ints = Image.fromarray(np.array([[-5, 0, 4095, 65535, 70000]], dtype=np.int32))  # mode I: clipped to 0-65535
    assert ints.mode == "I" and gray_channels(pil_pixels(ints)) == [0, 0, 15, 255, 255]
    floats = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 0.2, 1.0, 3.0]], dtype=np.float32))  # mode F: 0-1
    assert floats.mode == "F" and gray_channels(pil_pixels(floats)) == [0, 0, 128, 51, 255, 255]  # 127.5, 51.0


def test_alpha_palette_and_cmyk_as_pil_converts_them(tmp_path) -> None:
    rgba = Image.new("RGBA", (4, 3), (10, 200, 30, 0))  # fully transparent: the alpha is dropped, not blended
    palette = Image.new("RGB", (4, 3), (250, 5, 60)).convert("P")
    cmyk = Image.new("CMYK", (4, 3), (10, 20, 30, 40))
    for name, image in (("rgba.png", rgba), ("la.png", rgba.convert("LA")), ("palette.png", palette),
                        ("palette.bmp", palette), ("cmyk.tif", cmyk), ("rgba.tif", rgba)):
        image.save(tmp_path / name)
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(read_image(str(tmp_path / name)), expected), name


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp"])
def test_an_animation_gives_its_first_frame(tmp_path, name: str) -> None:
    frames = [Image.new("RGB", (6, 4), colour) for colour in ((0, 0, 255), (255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], lossless=True)
    image = read_image(str(tmp_path / name))  # GIF: torchvision (all frames); WEBP: PIL (torchvision refuses it)
    assert image.shape == (3, 4, 6) and image[:, 0, 0].tolist() == [0, 0, 255]


def test_unreadable_files_stop_with_one_line_naming_them(tmp_path) -> None:
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "ok.bmp")
    data = (tmp_path / "ok.bmp").read_bytes()
    (tmp_path / "truncated.bmp").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.tif").write_text("not an image at all")
    for name, reason in (("truncated.bmp", "truncated"), ("text.tif", "not an image format that PIL or torchvision")):
        with pytest.raises(CorruptImageError, match=re.escape(str(tmp_path / name)) + ".*" + reason) as caught:
            read_image(str(tmp_path / name))
        assert "\n" not in str(caught.value)


def listed(ids: list[str]) -> MultiLabelDataset:
    samples = [Sample.from_dense(i, f"/images/{i}.jpg", np.ones(2, np.float32), np.zeros(2, np.bool_)) for i in ids]
    return MultiLabelDataset(samples, ["a", "b"], name="voc2007:trainval")


def test_hold_out_splits_the_images_by_seed_alone_and_never_shares_one() -> None:
    ids = [f"{i:06d}" for i in range(50)]
    kept, held = hold_out(listed(ids), 0.1, seed=0)
    assert len(held) == 5 and len(kept) == 45
    kept_ids, held_ids = [s.image_id for s in kept.samples], [s.image_id for s in held.samples]
    assert not set(kept_ids) & set(held_ids) and sorted(kept_ids + held_ids) == ids
    assert kept_ids == sorted(kept_ids) and held.classes == ["a", "b"]  # the split's own order is kept
    _, reversed_held = hold_out(listed(ids[::-1]), 0.1, seed=0)
    assert {s.image_id for s in reversed_held.samples} == set(held_ids)  # whatever the order the split lists
    _, other = hold_out(listed(ids), 0.1, seed=1)
    assert {s.image_id for s in other.samples} != set(held_ids)


def test_hold_out_refuses_a_fraction_that_leaves_nothing_to_train_on() -> None:
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(DatasetError, match="--holdout-fraction"):
            hold_out(listed(["a", "b", "c"]), fraction, seed=0)
    assert len(hold_out(listed(["a", "b", "c"]), 0.01, seed=0)[1]) == 1  # at least one image chooses
    with pytest.raises(DatasetError, match="voc2007:trainval: 1 image"):
        hold_out(listed(["a"]), 0.5, seed=0)


def _labelled(count: int, classes: int = 3) -> MultiLabelDataset:
    rng = np.random.default_rng(0)
    samples = [Sample.from_dense(f"{index:03d}", f"/x/{index}.jpg", (rng.random(classes) < 0.4).astype(np.float32),
                                 rng.random(classes) < 0.2) for index in range(count)]
    return MultiLabelDataset(samples, [f"c{index}" for index in range(classes)], name="t")


def test_drop_labels_hides_the_same_share_of_every_class_whatever_the_order() -> None:
    dataset = _labelled(40)
    dropped = drop_labels(dataset, 0.25, seed=3)
    before, after = (d.dense_labels()[0].numpy() for d in (dataset, dropped))
    hidden = after == -1
    assert hidden.sum(axis=0).tolist() == [10, 10, 10]  # round(0.25 * 40) per class, positives and negatives alike
    assert (before[hidden] == 1).any() and (before[hidden] == 0).any()
    assert np.array_equal(after[~hidden], before[~hidden])
    assert not dropped.dense_labels()[1].numpy()[hidden].any()  # nobody annotated it
    # The same images whatever the order the split lists them in, another set with another seed.
    shuffled = MultiLabelDataset(dataset.samples[::-1], dataset.classes, name="t")
    assert {s.image_id: s.labels.tolist() for s in drop_labels(shuffled, 0.25, seed=3).samples} == \
        {s.image_id: s.labels.tolist() for s in dropped.samples}
    assert not np.array_equal(drop_labels(dataset, 0.25, seed=4).dense_labels()[0].numpy(), after)
    assert np.array_equal(drop_labels(dataset, 0.0, seed=3).dense_labels()[0].numpy(), before)
    with pytest.raises(DatasetError, match="--drop-labels .* in \\[0, 1\\): got 1"):
        drop_labels(dataset, 1, seed=3)


def test_unknown_only_classes() -> None:
    dataset = _labelled(4)
    hidden = [Sample(s.image_id, s.path, s.labels[s.labels["class_id"] != 1]) for s in dataset.samples]
    unknown = [Sample(s.image_id, s.path, make_labels({**dict(s.labels.tolist()), 1: Label.UNKNOWN}))
               for s in dataset.samples]
    assert unknown_only_classes(dataset.with_samples(unknown, "t")) == ["c1"]
    # Where an unlisted class is unknown, a class nobody lists has no known label.
    assert unknown_only_classes(MultiLabelDataset(hidden, dataset.classes, unlisted="unknown")) == ["c1"]
    assert unknown_only_classes(MultiLabelDataset(hidden, dataset.classes)) == []
    assert unknown_only_classes(MultiLabelDataset([], ["a"], name="empty")) == []


@pytest.mark.parametrize("unlisted", ["absent", "unknown"])
def test_sparse_labels_give_back_the_dense_rows(unlisted: str) -> None:
    rng = np.random.default_rng(1)
    target = rng.choice(np.array([0.0, 1.0, -1.0], np.float32), size=(30, 12))
    difficult = (rng.random((30, 12)) < 0.3) & (target == 1)
    samples = [Sample(str(i), f"/x/{i}.jpg", labels_from_dense(t, d, unlisted))
               for i, (t, d) in enumerate(zip(target, difficult, strict=True))]
    dense_target, dense_difficult = MultiLabelDataset(samples, list("abcdefghijkl"), unlisted=unlisted).dense_labels()
    assert np.array_equal(dense_target.numpy(), target) and np.array_equal(dense_difficult.numpy(), difficult)
    # Only the labels that differ from the unlisted state are stored.
    stored = sum(len(s.labels) for s in samples)
    assert stored == (target != (0.0 if unlisted == "absent" else -1.0)).sum()


def test_label_counts_and_drop_labels_where_unlisted_is_unknown() -> None:
    samples = [Sample("a", "/a.jpg", make_labels({0: Label.PRESENT, 2: Label.ABSENT})),
               Sample("b", "/b.jpg", make_labels({0: Label.DIFFICULT})), Sample("c", "/c.jpg")]
    dataset = MultiLabelDataset(samples, ["x", "y", "z"], unlisted="unknown")
    # Columns: absent, present, difficult, unknown (Label order).
    assert label_counts(dataset).tolist() == [[0, 1, 1, 1], [0, 0, 0, 3], [1, 0, 0, 2]]
    dropped = drop_labels(dataset, 0.5, seed=0)  # round(0.5 * 3) = 2 labels of every class hidden
    assert (label_counts(dropped)[:, Label.UNKNOWN] >= 2).all()
    assert all(Label.UNKNOWN not in s.labels["state"] for s in dropped.samples)  # unknown is not stored here


def test_a_sample_refuses_labels_out_of_order_and_a_dataset_a_class_id_beyond_its_classes() -> None:
    with pytest.raises(TypeError, match="a: labels must be LABELS_DTYPE"):
        Sample("a", "/a.jpg", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="b: labels must list each class once"):
        Sample("b", "/b.jpg", np.array([(2, 1), (1, 1)], dtype=LABELS_DTYPE))
    with pytest.raises(DatasetError, match="t: c has a label of class id 3, expected ids 0 to 2 of 3 classes"):
        MultiLabelDataset([Sample("c", "/c.jpg", make_labels({3: Label.PRESENT}))], ["x", "y", "z"], name="t")
    with pytest.raises(DatasetError, match="t: d has a label of class id -1"):
        MultiLabelDataset([Sample("d", "/d.jpg", make_labels({-1: Label.PRESENT, 0: Label.PRESENT}))], ["x"], name="t")
    with pytest.raises(ValueError, match="e: a label state is not a Label: \\[7\\]"):
        Sample("e", "/e.jpg", np.array([(0, 7)], dtype=LABELS_DTYPE))


def test_a_sample_table_gives_back_each_sample_and_takes_rows_in_any_order() -> None:
    samples = [Sample(f"id-{i}é", f"/x/{i}.jpg", make_labels({c: Label.PRESENT for c in range(i % 4)}))
               for i in range(7)]
    table = SampleTable.from_samples(samples)

    def plain(rows) -> list[tuple]:
        return [(s.image_id, s.path, s.labels.tolist()) for s in rows]

    assert len(table) == 7 and plain(table) == plain(samples) and plain([table[-1]]) == plain(samples[-1:])
    assert table.image_ids() == [s.image_id for s in samples] and table.paths() == [s.path for s in samples]
    assert plain(table[5:1:-2]) == plain([samples[5], samples[3]])
    assert plain(table.take([6, 0, 6])) == plain([samples[6], samples[0], samples[6]])
    assert len(table.take([])) == 0 and len(SampleTable.from_samples([])) == 0
    with pytest.raises(IndexError):
        table[7]
    with pytest.raises(ValueError):  # a sample's labels are a view of the table, which nothing may change
        table[3].labels["state"][0] = Label.ABSENT
    # A dataset keeps its samples as a table, however they are given.
    assert isinstance(MultiLabelDataset(iter(samples), ["a", "b", "c"]).samples, SampleTable)
