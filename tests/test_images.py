"""The user's own images: listing folders and files, and the dataset engine.predict runs on."""

import logging
import os

import pytest
import torch
from PIL import Image

from udtimm.data.base import CorruptImageError, DatasetError
from udtimm.data.images import NAMED_SKIPPED, ImageFolderDataset, image_extensions, list_images


def write_image(path: str, size: tuple[int, int] = (20, 12)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 30, 10)).save(path)
    return path


def test_folders_are_listed_recursively_sorted_with_every_image_format_and_name_what_they_leave_out(
        tmp_path, caplog) -> None:
    images = ("a.PNG", "b.jpg", "e.webp", "f.gif", "g.BMP", "h.tif", "i.tiff", "sub/c.jpeg", "sub/deeper/d.JPG",
              "sub/j.ppm")
    for name in images:
        write_image(str(tmp_path / name))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "labels.csv").write_text("image,labels\n")
    with caplog.at_level(logging.WARNING, logger="udtimm.data.images"):
        assert list_images([str(tmp_path)]) == sorted(str(tmp_path / name) for name in images)
    assert caplog.messages == [f"left out 2 file(s) of {tmp_path}, whose extensions are not those of an image "
                               f"format: notes.txt, {os.path.join('sub', 'labels.csv')}"]


def test_a_note_names_the_first_left_out_files_and_counts_the_rest(tmp_path, caplog) -> None:
    write_image(str(tmp_path / "a.png"))
    for i in range(NAMED_SKIPPED + 2):
        (tmp_path / f"{i:02d}.txt").write_text("")
    with caplog.at_level(logging.WARNING, logger="udtimm.data.images"):
        list_images([str(tmp_path)])
    names = ", ".join(f"{i:02d}.txt" for i in range(NAMED_SKIPPED))
    assert caplog.messages == [f"left out {NAMED_SKIPPED + 2} file(s) of {tmp_path}, whose extensions are not those "
                               f"of an image format: {names} and 2 more"]


def test_the_extensions_are_those_of_the_formats_pil_decodes() -> None:
    extensions = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".tga"} <= extensions
    assert not {".txt", ".csv", ".h5", ".mpg", ".pdf"} & extensions  # stub, video and write-only formats of PIL


def test_files_are_kept_in_the_given_order_after_folders(tmp_path) -> None:
    second, first = write_image(str(tmp_path / "z.jpg")), write_image(str(tmp_path / "dir" / "a.jpg"))
    assert list_images([second, str(tmp_path / "dir")]) == [second, first]


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DatasetError, match="nowhere.jpg"):
        list_images([str(tmp_path / "nowhere.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"no image files in {tmp_path / 'empty'}$"):
        list_images([write_image(str(tmp_path / "a.png")), str(tmp_path / "empty")])
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(DatasetError, match=f"no image files in {tmp_path / 'empty'}: notes.txt$"):
        list_images([str(tmp_path / "empty")])
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
    bmp = str(tmp_path / "scan.dat")
    Image.new("L", (5, 4)).save(bmp, format="BMP")  # named as given: what counts is the content
    assert list_images([good, str(tmp_path / "fake.jpg"), bmp]) == [good, str(tmp_path / "fake.jpg"), bmp]
    with pytest.raises(CorruptImageError, match=r"notes.txt is not an image \(no format that PIL or torchvision"):
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
