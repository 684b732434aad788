"""PASCAL VOC2007 (and anything in its layout, like the embedded `digits`): image-level labels from the XMLs."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from .base import DatasetError, Label, Sample, make_labels

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

VOC_LAYOUT = """\
  VOCdevkit/                      <- --data-dir may point here ...
    VOC2007/                      <- ... or here
      JPEGImages/<id>.jpg
      Annotations/<id>.xml
      ImageSets/Main/<split>.txt  (trainval.txt, test.txt, ...: one image id per line)
      classes.txt                 (optional: one class name per line; default: the 20 VOC classes)"""


def find_voc_dir(root: str) -> str:
    """Return the directory holding JPEGImages/, Annotations/ and ImageSets/Main/ (`root` or `root/VOC2007`)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"VOC root {root} does not exist; expected this layout:\n{VOC_LAYOUT}")
    voc_dir = os.path.join(root, "VOC2007") if os.path.isdir(os.path.join(root, "VOC2007")) else root
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        if not os.path.isdir(os.path.join(voc_dir, sub)):
            raise DatasetError(
                f"VOC directory {voc_dir} has no {sub}/ (given root: {root}); expected this layout:\n{VOC_LAYOUT}"
            )
    return voc_dir


def read_classes_file(path: str) -> list[str]:
    """Class names, one per non-blank line; an empty file or a repeated name raises DatasetError."""
    with open(path, encoding="utf-8") as f:
        classes = [line.strip() for line in f if line.strip()]
    if not classes:
        raise DatasetError(f"{path}: no class names (expected one per line)")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise DatasetError(f"{path}: class {dup!r} is listed twice")
    return classes


def load_voc(root: str, split: str, classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Load ImageSets/Main/<split>.txt of a VOC-layout dataset as multi-label samples (docs/method.md#difficult-labels).

    `classes=None` uses the dataset's classes.txt if it has one, else VOC_CLASSES. A class is difficult for an
    image iff every object of that class in it is marked difficult; images without objects are kept.
    """
    voc_dir = find_voc_dir(root)
    if classes is None:
        classes_file = os.path.join(voc_dir, "classes.txt")
        classes = read_classes_file(classes_file) if os.path.isfile(classes_file) else VOC_CLASSES
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}

    split_file = os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt")
    ids = _read_split(split_file)
    samples = []
    for line_no, image_id in ids:
        xml_path = os.path.join(voc_dir, "Annotations", f"{image_id}.xml")
        jpg_path = os.path.join(voc_dir, "JPEGImages", f"{image_id}.jpg")
        for path in (xml_path, jpg_path):
            if not os.path.isfile(path):
                raise DatasetError(f"{path} is missing (image {image_id!r}, listed at {split_file} line {line_no})")
        try:
            labels = _parse_xml(xml_path, index)
        except DatasetError as e:
            raise DatasetError(f"{e} (image {image_id!r}, listed at {split_file} line {line_no})") from e
        samples.append(Sample(image_id, jpg_path, labels))
    return samples, classes


def _read_split(split_file: str) -> list[tuple[int, str]]:
    """(line number, image id) pairs of a split file; missing, empty or repeated ids raise DatasetError."""
    if not os.path.isfile(split_file):
        main_dir = os.path.dirname(split_file)
        # Per-class files (aeroplane_trainval.txt, ...) are not splits of their own.
        available = sorted(f[:-4] for f in os.listdir(main_dir) if f.endswith(".txt") and "_" not in f)
        raise DatasetError(
            f"split file {split_file} does not exist; available splits: {', '.join(available) or 'none'}"
        )
    try:
        with open(split_file, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"split file {split_file} cannot be read as text: {e}") from e
    ids: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id in first_line:
            raise DatasetError(
                f"{split_file} line {line_no}: image id {image_id!r} is listed twice (first at line "
                f"{first_line[image_id]})"
            )
        first_line[image_id] = line_no
        ids.append((line_no, image_id))
    if not ids:
        raise DatasetError(f"split file {split_file} lists no image ids")
    return ids


def _parse_xml(xml_path: str, index: dict[str, int]) -> np.ndarray:
    """The labels of one annotation file: its classes present, DIFFICULT where every object of a class is."""
    try:
        annotation = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{xml_path}: malformed XML: {e}") from e
    states: dict[int, int] = {}
    for obj in annotation.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise DatasetError(f"{xml_path}: unknown class {name!r}; known classes: {', '.join(index)}")
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise DatasetError(f"{xml_path}: <difficult> of a {name!r} object is {flag!r}, expected 0 or 1")
        if flag == "0" or states.get(index[name]) != Label.PRESENT:
            states[index[name]] = Label.PRESENT if flag == "0" else Label.DIFFICULT
    return make_labels(states)
