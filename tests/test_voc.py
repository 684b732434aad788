"""VOC2007 loader against torchvision's own VOC reader; MultiLabelDataset and read_image."""

import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import VOCDetection

from udtimm.data import DatasetError, build_dataset
from udtimm.data.base import (
    CorruptImageError,
    Label,
    MultiLabelDataset,
    Sample,
    check_unique_ids,
    make_labels,
    read_image,
)
from udtimm.data.voc import VOC_CLASSES, load_voc

# id -> objects as (class, difficult flag or None for a missing <difficult> tag)
ANNOTATIONS = {
    "000001": [("dog", "0"), ("person", "1")],
    "000002": [("cat", "1"), ("cat", "0"), ("car", "1"), ("car", "1")],  # cat mixed -> easy, car all difficult
    "000003": [],  # no object: kept, all-negative
    "000004": [("bird", None), ("chair", "1")],  # a missing <difficult> means 0
    "000005": [("tvmonitor", "0"), ("sheep", "0"), ("tvmonitor", "1")],
    "000006": [("aeroplane", "1")],
}
SPLITS = {"trainval": ["000001", "000002", "000003", "000004"], "test": ["000005", "000006"]}


def write_annotation(path, image_id, objects):
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", "8"), ("height", "6"), ("depth", "3")):
        ET.SubElement(size, tag).text = value
    for name, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        if difficult is not None:
            ET.SubElement(obj, "difficult").text = difficult
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", "1"), ("ymin", "1"), ("xmax", "5"), ("ymax", "4")):
            ET.SubElement(box, tag).text = value
    ET.ElementTree(root).write(path)


def make_voc(base, annotations=ANNOTATIONS, splits=SPLITS):
    """A VOCdevkit/VOC2007 tree under `base`; returns the VOCdevkit path."""
    voc = base / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, objects in annotations.items():
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        write_annotation(voc / "Annotations" / f"{image_id}.xml", image_id, objects)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (voc / "ImageSets" / "Main" / "aeroplane_trainval.txt").write_text("000001 -1\n000006  1\n")
    return base / "VOCdevkit"


@pytest.fixture
def devkit(tmp_path):
    return make_voc(tmp_path)


def expected_from_torchvision(annotation, classes):
    """Target and difficult mask built from torchvision's parse of one annotation file."""
    target = np.zeros(len(classes), dtype=np.float32)
    easy = np.zeros(len(classes), dtype=bool)
    for obj in annotation["annotation"]["object"]:
        c = classes.index(obj["name"])
        target[c] = 1
        easy[c] |= int(obj.get("difficult", 0)) == 0
    return target, (target > 0) & ~easy


@pytest.mark.parametrize("split", ["trainval", "test"])
def test_matches_torchvision_voc_detection(devkit, split):
    reference = VOCDetection(str(devkit.parent), year="2007", image_set=split, download=False)
    for root in (devkit, devkit / "VOC2007"):  # the VOCdevkit dir or the VOC2007 dir itself
        samples, classes = load_voc(str(root), split)
        assert classes == list(VOC_CLASSES)
        assert [s.image_id for s in samples] == SPLITS[split]
        for i, s in enumerate(samples):
            image, annotation = reference[i]
            target, difficult = expected_from_torchvision(annotation, classes)
            got_target, got_difficult = s.dense(len(classes))
            np.testing.assert_array_equal(got_target, target)
            np.testing.assert_array_equal(got_difficult, difficult)
            assert got_target.dtype == np.float32 and got_difficult.dtype == np.bool_
            assert os.path.isabs(s.path) and s.path == os.path.abspath(reference.images[i])
            assert tuple(read_image(s.path).shape) == (3, image.height, image.width)


def test_difficult_rule(devkit):
    by_id = {s.image_id: s for s in load_voc(str(devkit), "trainval")[0] + load_voc(str(devkit), "test")[0]}
    c = VOC_CLASSES.index
    target = {image_id: s.dense(len(VOC_CLASSES))[0] for image_id, s in by_id.items()}
    difficult = {image_id: s.dense(len(VOC_CLASSES))[1] for image_id, s in by_id.items()}
    assert target["000002"][c("cat")] == 1 and not difficult["000002"][c("cat")]  # one easy cat
    assert target["000002"][c("car")] == 1 and difficult["000002"][c("car")]  # every car difficult
    assert target["000003"].sum() == 0 and not difficult["000003"].any()
    assert target["000004"][c("bird")] == 1 and not difficult["000004"][c("bird")]  # tag missing
    assert not difficult["000005"].any()
    assert difficult["000006"].tolist() == [True] + [False] * 19


def test_classes_file(devkit):
    (devkit / "VOC2007" / "classes.txt").write_text("\n".join(sorted(VOC_CLASSES)) + "\n")
    samples, classes = load_voc(str(devkit), "test")
    assert classes == sorted(VOC_CLASSES)
    assert samples[1].dense(len(classes))[0][classes.index("aeroplane")] == 1
    samples, classes = load_voc(str(devkit), "test", classes=VOC_CLASSES)  # explicit classes win
    assert classes == list(VOC_CLASSES)


def test_missing_root_or_subdir_shows_layout(tmp_path, devkit):
    with pytest.raises(DatasetError, match=r"(?s)does not exist.*VOCdevkit/.*VOC2007/.*Annotations/"):
        load_voc(str(tmp_path / "nowhere"), "test")
    os.rename(devkit / "VOC2007" / "Annotations", devkit / "VOC2007" / "Ann")
    with pytest.raises(DatasetError, match=r"(?s)has no Annotations/.*JPEGImages/<id>\.jpg"):
        load_voc(str(devkit), "test")


def test_split_file_errors(devkit):
    with pytest.raises(DatasetError, match=r"val\.txt does not exist; available splits: test, trainval$"):
        load_voc(str(devkit), "val")
    empty = devkit / "VOC2007" / "ImageSets" / "Main" / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty.txt lists no image ids"):
        load_voc(str(devkit), "empty")


def test_duplicate_id_names_line(devkit):
    (devkit / "VOC2007" / "ImageSets" / "Main" / "dup.txt").write_text("000001\n000002\n\n000001\n")
    with pytest.raises(DatasetError, match=r"dup\.txt line 4: image id '000001' is listed twice \(first at line 1\)"):
        load_voc(str(devkit), "dup")


def test_unknown_class_names_xml_and_class(tmp_path):
    root = make_voc(tmp_path, {**ANNOTATIONS, "000006": [("spaceship", "0")]})
    with pytest.raises(DatasetError, match=r"000006\.xml: unknown class 'spaceship'; known classes: aeroplane, "):
        load_voc(str(root), "test")


@pytest.mark.parametrize("missing", ["Annotations/000005.xml", "JPEGImages/000005.jpg"])
def test_missing_file_names_it_and_split_line(devkit, missing):
    os.remove(devkit / "VOC2007" / missing)
    with pytest.raises(DatasetError, match=rf"{missing} is missing \(image '000005', listed at .*test\.txt line 1\)"):
        load_voc(str(devkit), "test")


def test_dataset_items_and_build(devkit):
    ds = build_dataset("voc2007", str(devkit), "train", transform=lambda x: x.float() / 255)
    assert ds.name == "voc2007:trainval" and len(ds) == 4 and ds.classes == list(VOC_CLASSES)
    image, target, difficult, index = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 6, 8) and index == 1
    assert target.dtype == torch.float32 and difficult.dtype == torch.bool
    torch.testing.assert_close(target, torch.from_numpy(ds.samples[1].dense(len(ds.classes))[0]))
    targets, difficult_masks = ds.dense_labels()
    assert targets.shape == (4, 20) and difficult_masks.dtype == torch.bool
    torch.testing.assert_close(difficult_masks[1], difficult)
    ds.transform = None
    assert ds[0][0].dtype == torch.uint8
    assert build_dataset("voc2007", str(devkit), "test").name == "voc2007:test"
    assert len(build_dataset("voc2007", str(devkit), "aeroplane_trainval")) == 2  # any ImageSets/Main file
    empty = MultiLabelDataset([], ["a", "b"])
    assert [labels.shape for labels in empty.dense_labels()] == [(0, 2), (0, 2)]


def test_read_image_gray_and_corrupt(tmp_path):
    Image.fromarray(np.full((5, 7), 100, dtype=np.uint8)).save(tmp_path / "gray.jpg")
    assert read_image(str(tmp_path / "gray.jpg")).shape == (3, 5, 7)  # always RGB
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    for name in ("truncated.jpg", "garbage.jpg", "missing.jpg"):
        with pytest.raises(CorruptImageError, match=re.escape(str(tmp_path / name))):
            read_image(str(tmp_path / name))


def test_sample_checks_and_unique_ids():
    one = Sample("a", "/a.jpg", make_labels({2: Label.PRESENT}))
    with pytest.raises(TypeError, match="b: labels must be LABELS_DTYPE"):
        Sample("b", "/b.jpg", np.zeros(3, dtype=np.float32))  # a dense target is not labels
    check_unique_ids([one], "list.txt")
    with pytest.raises(DatasetError, match="list.txt: image id 'a' is listed twice"):
        check_unique_ids([one, one], "list.txt")
    with pytest.raises(DatasetError, match="expected ids 0 to 1 of 2 classes"):
        MultiLabelDataset([one], ["x", "y"])  # class id 2 of 2 classes
