"""COCO loader against a direct reading of a tiny instances json."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from udtimm.data import DatasetError, build_dataset
from udtimm.data.base import CorruptImageError
from udtimm.data.coco import load_coco

# Non-contiguous category ids, listed out of order, as in the real file (ids 1..90 with gaps).
CATEGORIES = [{"id": 7, "name": "train", "supercategory": "vehicle"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]
IMAGES = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 8, "height": 6},
          {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 8, "height": 6},
          {"id": 100, "file_name": "COCO_val2014_000000000100.jpg", "width": 8, "height": 6},  # no annotation
          {"id": 5, "file_name": "COCO_val2014_000000000005.jpg", "width": 8, "height": 6}]
ANNOTATIONS = [{"id": 1, "image_id": 42, "category_id": 7, "iscrowd": 0, "bbox": [0, 0, 2, 2], "segmentation": []},
               {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 2, 2], "segmentation": []},
               {"id": 3, "image_id": 42, "category_id": 7, "iscrowd": 0, "bbox": [1, 1, 2, 2], "segmentation": []},
               {"id": 4, "image_id": 7, "category_id": 3, "iscrowd": 0, "bbox": [0, 0, 2, 2], "segmentation": []},
               {"id": 5, "image_id": 5, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 8, 6], "segmentation": {}}]


def make_coco(base, split="val2014", images=IMAGES, annotations=ANNOTATIONS, write_images=True):
    (base / "annotations").mkdir(exist_ok=True)
    (base / split).mkdir(exist_ok=True)
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}
    (base / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    if write_images:
        for im in images:
            Image.new("RGB", (im["width"], im["height"]), (200, 30, 30)).save(base / split / im["file_name"])
    return base


def expected(json_path):
    """Per image id: the set of category names, straight from the json."""
    with open(json_path) as f:
        data = json.load(f)
    names = {c["id"]: c["name"] for c in data["categories"]}
    labels = {im["id"]: set() for im in data["images"]}
    for ann in data["annotations"]:
        labels[ann["image_id"]].add(names[ann["category_id"]])
    return labels


def test_matches_json(tmp_path):
    make_coco(tmp_path)
    samples, classes = load_coco(str(tmp_path), "val2014")
    assert classes == ["person", "car", "train"]  # category-id order: 1, 3, 7
    labels = expected(tmp_path / "annotations" / "instances_val2014.json")
    assert sorted(s.image_id for s in samples) == sorted(str(i) for i in labels)  # the unannotated image is kept
    for s in samples:
        want = labels[int(s.image_id)]
        target, difficult = s.dense(len(classes))
        assert {classes[i] for i in np.flatnonzero(target)} == want
        assert target.dtype == np.float32 and not difficult.any()
        assert os.path.isfile(s.path) and os.path.dirname(s.path) == str(tmp_path / "val2014")
    by_id = {s.image_id: s for s in samples}
    assert by_id["100"].dense(len(classes))[0].sum() == 0
    assert by_id["5"].dense(len(classes))[0].tolist() == [1, 0, 0]  # a crowd annotation counts as present


def test_build_dataset_splits(tmp_path):
    make_coco(tmp_path, "val2014")
    make_coco(tmp_path, "train2014", images=IMAGES[:2], annotations=ANNOTATIONS[:4])
    assert build_dataset("coco2014", str(tmp_path), "test").name == "coco2014:val2014"
    train = build_dataset("coco2014", str(tmp_path), "train")
    assert train.name == "coco2014:train2014" and len(train) == 2 and train.dense_labels()[0].shape == (2, 3)
    assert build_dataset("coco2014", str(tmp_path), "val2014").name == "coco2014:val2014"


def test_images_not_opened_at_start(tmp_path):
    make_coco(tmp_path, write_images=False)  # no image files at all: loading still works, reading fails
    ds = build_dataset("coco2014", str(tmp_path), "val2014")
    assert len(ds) == 4
    with pytest.raises(CorruptImageError, match="COCO_val2014_000000000005.jpg"):
        ds[0]


def test_missing_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)instances_val2014\.json does not exist.*annotations/instances_"):
        load_coco(str(tmp_path), "val2014")
    make_coco(tmp_path)
    os.rename(tmp_path / "val2014", tmp_path / "images")
    with pytest.raises(DatasetError, match=r"(?s)image directory .*val2014 does not exist.*train2014/<file_name>"):
        load_coco(str(tmp_path), "val2014")


def test_bad_json(tmp_path):
    bad = [*ANNOTATIONS, {"id": 9, "image_id": 42, "category_id": 2, "iscrowd": 0}]
    make_coco(tmp_path, annotations=bad)
    with pytest.raises(DatasetError, match=r"instances_val2014\.json: annotation 9 has unknown category_id 2"):
        load_coco(str(tmp_path), "val2014")
    make_coco(tmp_path, images=[*IMAGES, IMAGES[0]])
    with pytest.raises(DatasetError, match=r"instances_val2014\.json: image id '42' is listed twice"):
        load_coco(str(tmp_path), "val2014")
    (tmp_path / "annotations" / "instances_val2014.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        load_coco(str(tmp_path), "val2014")
