"""Bad input: corrupt images, bad annotations and CSV rows, bad checkpoints, files that would run code, output
that cannot be written; each refused with a message naming the file, flag or class at fault, before any work."""

import logging
import os
import re
import shutil

import pytest
import torch
from conftest import read_rows, run_two_cpu_processes, tiny_train_args

import distill
import train
from udtimm import checkpoint
from udtimm.checkpoint import CheckpointError
from udtimm.config import ConfigError
from udtimm.data.base import CorruptImageError, DatasetError
from udtimm.model import ModelConfigError, create_model
from udtimm.settings import ModelSettings

# ---------------------------------------------------------------- 4. bad data


def copy_digits(tiny_digits: str, destination) -> str:
    """A copy of the tiny digits set to damage; returns its VOC2007 directory."""
    shutil.copytree(tiny_digits, destination)
    return os.path.join(destination, "VOC2007")


def first_id(voc_dir: str, split: str) -> str:
    with open(os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt")) as handle:
        return handle.readline().strip()


@pytest.fixture(scope="module")
def corrupt_digits(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """Digits with one truncated JPEG in trainval and one in test; returns (root, [train image, test image])."""
    root = str(tmp_path_factory.mktemp("corrupt") / "digits")
    voc_dir = copy_digits(tiny_digits, root)
    paths = [os.path.join(voc_dir, "JPEGImages", f"{first_id(voc_dir, split)}.jpg") for split in ("trainval", "test")]
    for path in paths:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    return root, paths


def test_a_truncated_jpeg_is_an_error_naming_the_file(corrupt_digits: tuple[str, list[str]], tmp_path) -> None:
    root, (train_image, _) = corrupt_digits
    with pytest.raises(CorruptImageError, match=re.escape(train_image)):
        train.main(tiny_train_args(root, str(tmp_path), "--epochs", "1"))


@pytest.mark.slow
def test_skip_corrupt_leaves_truncated_jpegs_out_logs_each_once_and_counts_them(
        corrupt_digits: tuple[str, list[str]], tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    root, paths = corrupt_digits
    with caplog.at_level(logging.WARNING, logger="udtimm.data.loader"):
        result = train.main(tiny_train_args(root, str(tmp_path), "--epochs", "1", "--skip-corrupt",
                                            "--experiment", "s"))
    (row,) = read_rows(str(tmp_path / "s" / "summary.csv"))
    assert row["skipped_images"] == "1"  # the training image; the test image shows in num_images
    assert result["num_images"] == 39
    for path in paths:  # the test image was left out twice (epoch 0 and the final evaluation), logged once
        assert sum(path in record.getMessage() for record in caplog.records) == 1


@pytest.mark.slow
def test_skip_corrupt_in_two_processes_counts_each_left_out_image_once(
        corrupt_digits: tuple[str, list[str]], tmp_path) -> None:
    """Batches shrink unevenly across processes; steps stay in lockstep and the counts are of the whole run."""
    root, _ = corrupt_digits
    result = run_two_cpu_processes("train.py", *tiny_train_args(root, str(tmp_path), "--epochs", "1",
                                                                "--skip-corrupt", "--experiment", "s2"))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_rows(str(tmp_path / "s2" / "summary.csv"))
    assert row["skipped_images"] == "1"
    (result_row,) = read_rows(str(tmp_path / "s2" / "results.csv"))
    assert float(result_row["num_images"]) == 39


def break_voc(voc_dir: str, case: str) -> str:
    """Damage the copy as `case` says; returns what the error must name (file and line)."""
    main_dir = os.path.join(voc_dir, "ImageSets", "Main")
    trainval = os.path.join(main_dir, "trainval.txt")
    if case == "unknown class":
        image_id = first_id(voc_dir, "trainval")
        xml = os.path.join(voc_dir, "Annotations", f"{image_id}.xml")
        text = open(xml).read()
        open(xml, "w").write(text.replace("<name>", "<name>eleven", 1))
        return rf"{xml}.*eleven.*{trainval} line 1\b"
    if case == "empty split":
        open(trainval, "w").close()
        return f"{trainval} lists no image ids"
    if case == "unreadable split":
        open(trainval, "wb").write(b"\xff\xfe\x00\x81" * 8)
        return f"{trainval} cannot be read"
    ids = open(trainval).read().split()
    open(trainval, "w").write("\n".join([*ids, ids[3]]) + "\n")  # "id twice"
    return rf"{trainval} line {len(ids) + 1}: image id '{ids[3]}' is listed twice \(first at line 4\)"


@pytest.mark.parametrize("case", ["unknown class", "empty split", "unreadable split", "id twice"])
def test_bad_voc_annotations_are_refused_before_training_naming_file_and_line(
        tiny_digits: str, tmp_path, case: str) -> None:
    root = str(tmp_path / "digits")
    expected = break_voc(copy_digits(tiny_digits, root), case)
    with pytest.raises(DatasetError, match=expected):
        train.main(tiny_train_args(root, str(tmp_path), "--experiment", "x"))
    assert not (tmp_path / "x" / "summary.csv").exists()


@pytest.mark.parametrize("case", ["missing image", "image twice"])
def test_bad_csv_rows_are_refused_before_training_naming_file_and_line(tiny_digits: str, tmp_path, case: str) -> None:
    voc_dir = os.path.join(tiny_digits, "VOC2007")
    images = [os.path.join(voc_dir, "JPEGImages", f"{index:06d}.jpg") for index in range(1, 5)]
    rows = [f"{path},one" for path in images]
    rows[2] = f"{tmp_path / 'gone.jpg'},one" if case == "missing image" else rows[0]
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    expected = r"train.csv line 4: image file .*gone.jpg does not exist" if case == "missing image" else \
        r"train.csv line 4: image .* is listed twice \(first at line 2\)"
    with pytest.raises(DatasetError, match=expected):
        train.main(["--dataset", "csv", "--data-dir", str(tmp_path), "--model", "test_resnet", "--img-size", "32",
                    "--workers", "0", "--output", str(tmp_path), "--experiment", "x", "--no-progress"])
    assert not (tmp_path / "x" / "summary.csv").exists()


# ---------------------------------------------------------------- 5. bad checkpoints


def test_a_truncated_teacher_is_refused_before_the_run_directory_exists(tiny_digits: str, tmp_path) -> None:
    classes = open(os.path.join(tiny_digits, "VOC2007", "classes.txt")).read().split()
    model = create_model(ModelSettings("test_resnet"), len(classes), cal=True)
    path = str(tmp_path / "teacher.safetensors")
    checkpoint.save_checkpoint(path, model, checkpoint.model_metadata("test_resnet", model, classes, None, 32,
                                                                      [0.5] * 3, [0.5] * 3))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="teacher.safetensors.*truncated"):
        distill.main(tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", path, "--experiment", "x"))
    assert not (tmp_path / "x").exists()


def test_weights_of_another_model_name_the_keys_that_differ(tmp_path) -> None:
    path = str(tmp_path / "resnet.safetensors")
    model = create_model(ModelSettings("test_resnet"), 3)
    checkpoint.save_checkpoint(path, model, checkpoint.model_metadata("test_resnet", model, ["a", "b", "c"], None, 32,
                                                                      [0.5] * 3, [0.5] * 3))
    tensors, _ = checkpoint.load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"resnet.safetensors does not fit this model: missing .* unexpected"):
        checkpoint.load_weights(create_model(ModelSettings("test_efficientnet"), 3), tensors, path)


# ---------------------------------------------------------------- 6. no code execution from files


class RunsCode:
    """Unpickling this creates the marker file: the proof that a file ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pth_with_a_pickle_payload_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = str(tmp_path / "weights.pth")
    torch.save({"fc.weight": torch.zeros(1), "payload": RunsCode(str(marker))}, path)
    with pytest.raises(ModelConfigError, match=r"weights.pth.*weights_only"):
        create_model(ModelSettings("test_resnet", pretrained_path=path), 3)
    assert not marker.exists()


def test_a_yaml_config_with_a_python_tag_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml.*python/object/apply:os.system"):
        train.parse_args(["-c", str(config)])
    assert not marker.exists()


# ---------------------------------------------------------------- 7. output that cannot be written


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tiny_digits: str, tmp_path) -> None:
    blocker = tmp_path / "output"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"output directory {blocker}/x is not writable"):
        train.main(tiny_train_args(tiny_digits, str(blocker), "--experiment", "x"))
