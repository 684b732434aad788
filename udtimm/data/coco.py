"""MS-COCO 2014 (or any split in its layout): image-level labels from the instances json."""

from __future__ import annotations

import json
import os

from .base import DatasetError, Label, Sample, check_unique_ids, make_labels

COCO_LAYOUT = """\
  <data-dir>/
    annotations/instances_train2014.json
    annotations/instances_val2014.json
    train2014/<file_name>   (COCO_train2014_000000000009.jpg, ...)
    val2014/<file_name>"""


def load_coco(root: str, split: str) -> tuple[list[Sample], list[str]]:
    """Load `root/annotations/instances_<split>.json` with images in `root/<split>/` (docs/method.md#difficult-labels).

    Classes are the json's categories in id order. Images without annotations are kept as all-negative samples;
    COCO has no difficult flag, so the masks are all False. Images are not opened here.
    """
    root = os.path.abspath(os.path.expanduser(root))
    json_path = os.path.join(root, "annotations", f"instances_{split}.json")
    image_dir = os.path.join(root, split)
    for path, kind in ((json_path, "annotation file"), (image_dir, "image directory")):
        if not os.path.exists(path):
            raise DatasetError(f"COCO {kind} {path} does not exist; expected this layout:\n{COCO_LAYOUT}")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images, annotations = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{json_path}: not a COCO instances file ({type(e).__name__}: {e})") from e
    del data  # the segmentations are most of the json; free them before the training starts

    class_index = {c["id"]: i for i, c in enumerate(categories)}
    present: dict[int, dict[int, int]] = {im["id"]: {} for im in images}
    for ann in annotations:
        # Crowd regions (iscrowd=1) count as present: the class is visible in the image, only not as single objects.
        if ann["category_id"] not in class_index:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        if ann["image_id"] not in present:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
        present[ann["image_id"]][class_index[ann["category_id"]]] = Label.PRESENT

    samples = [Sample(str(im["id"]), os.path.join(image_dir, im["file_name"]), make_labels(present[im["id"]]))
               for im in sorted(images, key=lambda im: im["id"])]
    check_unique_ids(samples, json_path)
    return samples, [c["name"] for c in categories]
