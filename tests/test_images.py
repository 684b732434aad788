"""The user's own images: listing folders and files, and the dataset engine.predict runs on."""

import os

import pytest
import torch
from PIL import Image

from udtimm.data.base import CorruptImageError, DatasetError
from udtimm.data.images import ImageFolderDataset, list_images


def write_image(path: str, size: tuple[int, int] = (20, 12)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 30, 10)).save(path)
    return path


def test_folders_are_listed_recursively_sorted_with_image_extensions_only(tmp_path) -> None:
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.JPG"):
        write_image(str(tmp_path / name))
    (tmp_path / "notes.txt").write_text("not an image")
    assert list_images([str(tmp_path)]) == sorted(
        str(tmp_path / name) for name in ("a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.JPG"))


def test_files_are_kept_in_the_given_order_after_folders(tmp_path) -> None:
    second, first = write_image(str(tmp_path / "z.jpg")), write_image(str(tmp_path / "dir" / "a.jpg"))
    assert list_images([second, str(tmp_path / "dir")]) == [second, first]


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DatasetError, match="nowhere.jpg"):
        list_images([str(tmp_path / "nowhere.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"no .jpg/.jpeg/.png images found in {tmp_path / 'empty'}"):
        list_images([write_image(str(tmp_path / "a.png")), str(tmp_path / "empty")])
    with pytest.raises(DatasetError, match="no images given"):
        list_images([])


def test_glob_patterns_are_expanded_and_must_match(tmp_path) -> None:
    for name in ("a.jpg", "b.png", "sub/c.jpg"):
        write_image(str(tmp_path / name))
    assert list_images([str(tmp_path / "*.jpg")]) == [str(tmp_path / "a.jpg")]
    assert list_images([str(tmp_path / "**" / "*.jpg")]) == [str(tmp_path / "a.jpg"), str(tmp_path / "sub/c.jpg")]
    with pytest.raises(DatasetError, match=r"no file matches .*\*\.gif"):
        list_images([str(tmp_path / "*.gif")])


def test_files_that_are_not_images_are_refused_before_decoding(tmp_path) -> None:
    good = write_image(str(tmp_path / "good.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.jpg").write_bytes(b"GIF87a but named .jpg")  # a GIF is an image, whatever its name
    assert list_images([good, str(tmp_path / "fake.jpg")]) == [good, str(tmp_path / "fake.jpg")]
    with pytest.raises(CorruptImageError, match=r"notes.txt is not an image \(JPEG, PNG, GIF or WEBP\)"):
        list_images([good, str(tmp_path / "notes.txt")])


def test_items_have_the_shape_of_a_multilabel_dataset_with_zero_labels(tmp_path) -> None:
    paths = [write_image(str(tmp_path / f"{i}.png"), (10 + i, 8)) for i in range(2)]
    dataset = ImageFolderDataset(paths, lambda image: image.float()[:, :4, :4], num_classes=5)
    assert len(dataset) == 2
    image, target, difficult, index = dataset[1]
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32 and index == 1
    assert target.dtype == torch.float32 and torch.equal(target, torch.zeros(5))
    assert difficult.dtype == torch.bool and not difficult.any()


def test_unreadable_image_names_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        ImageFolderDataset([str(bad)])[0]
