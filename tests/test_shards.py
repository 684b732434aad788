"""WebDataset shards (udtimm/data/shards.py writes them, udtimm/data/wds.py reads them, --dataset wds): the round trip,
_info.json, atomic writes, bad shards, evaluation, training, resume and two processes of two workers each."""

import json
import math
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from conftest import (
    TINY_DIGITS,
    assert_corrupt_image_is_named_and_skipped,
    assert_repeats_the_folder_run,
    read_rows,
    run_two_cpu_processes,
    tiny_train_args,
)
from test_bad_input import copy_digits
from test_reliability import assert_same_run, stopped_and_resumed
from torchvision.transforms.v2 import functional as F

import train
import validate
from udtimm.data import DATASETS, build_dataset, shards, wds
from udtimm.data.base import CorruptImageError, DatasetError, EncodedImage, hold_out, read_image
from udtimm.data.wds import FORMAT, ShardDataset, read_info
from udtimm.errors import ConfigError
from udtimm.metrics import METRIC_NAMES

SHARD_SIZE = 30  # 96 trainval images: shards of 30, 30, 30 and 6
DIGITS_FLAGS = ("--digits-trainval", str(TINY_DIGITS["num_trainval"]), "--digits-test", str(TINY_DIGITS["num_test"]))
SPLITS = {"train": "trainval", "test": "test", "val": "val"}  # digits' own names


def convert(data_dir: str, out: str, split: str, *extra: str) -> None:
    shards.main(["--dataset", "digits", "--data-dir", data_dir, *DIGITS_FLAGS, "--split", split, "--out", out,
                 "--shard-size", str(SHARD_SIZE), "--no-progress", *extra])


@pytest.fixture(scope="module")
def shard_dir(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny digits set's three splits as shards, written one after the other into one folder."""
    out = str(tmp_path_factory.mktemp("shards") / "digits")
    for split in SPLITS:
        convert(tiny_digits, out, split)
    return out


def wds_train_args(shard_dir: str, output: str, *extra: str) -> list[str]:
    """tiny_train_args reading the shards instead of the folder."""
    args = tiny_train_args(shard_dir, output, *extra)
    args[args.index("digits")] = "wds"
    return args


def folder_split(tiny_digits: str, split: str):
    return build_dataset("digits", tiny_digits, split, **TINY_DIGITS)


def tar_records(path: str) -> dict[str, dict[str, bytes]]:
    """A shard's records as Python's tarfile reads them: {key: {extension: bytes}}, in the tar's order."""
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            records.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return records


# ---------------------------------------------------------------- the converter


@pytest.mark.parametrize("split", SPLITS)
def test_every_record_keeps_its_image_file_and_labels(shard_dir: str, tiny_digits: str, split: str) -> None:
    folder, sharded = folder_split(tiny_digits, split), build_dataset("wds", shard_dir, split)
    assert isinstance(sharded, ShardDataset) and sharded.name == f"wds:{SPLITS[split]}"
    assert [s.image_id for s in sharded.samples] == [s.image_id for s in folder.samples]
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(sharded.samples, folder.samples, strict=True))
    assert sharded.classes == folder.classes and sharded.unlisted == folder.unlisted
    # Each record, read by tarfile rather than wids: a running key, the file's bytes and its JSON.
    records = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.startswith(f"{SPLITS[split]}-") and name.endswith(".tar"):
            records.update(tar_records(os.path.join(shard_dir, name)))
    assert list(records) == [f"{index:09d}" for index in range(len(folder))]
    for record, sample in zip(records.values(), folder.samples, strict=True):
        assert record["jpg"] == open(sample.path, "rb").read()
        labels = [[int(c), int(state)] for c, state in sample.labels]
        assert json.loads(record["json"]) == {"image_id": sample.image_id, "labels": labels, "source": sample.path}
    for index in (0, len(folder) - 1):  # through the dataset: the same pixels, targets and difficult masks
        assert all(torch.equal(a, b) for a, b in zip(sharded[index][:3], folder[index][:3], strict=True))
        assert sharded.samples[index].path.endswith(f".tar#{index:09d}")


def test_info_json_lists_the_classes_the_source_and_each_splits_shards(shard_dir: str, tiny_digits: str) -> None:
    info = read_info(shard_dir)
    assert info["format"] == FORMAT and info["classes"] == folder_split(tiny_digits, "test").classes
    assert info["unlisted"] == "absent" and info["selection"] == "val" and info["aliases"] == {"train": "trainval"}
    assert info["source"] == {"dataset": "digits", "options": {"num_trainval": 96, "num_test": 40, "seed": 0,
                                                               "ambiguous": False}}
    counts = {"trainval": 96, "test": 40, "val": 20}
    assert set(info["splits"]) == set(counts)
    for split, count in counts.items():
        entry = info["splits"][split]
        sizes = [SHARD_SIZE] * (count // SHARD_SIZE) + ([count % SHARD_SIZE] if count % SHARD_SIZE else [])
        assert entry == {"shards": [{"url": f"{split}-{number:06d}.tar", "nsamples": size}
                                    for number, size in enumerate(sizes)],
                         "num_samples": count, "labels": f"{split}-labels.npz"}
    expected = {shard["url"] for entry in info["splits"].values() for shard in entry["shards"]}
    expected |= {entry["labels"] for entry in info["splits"].values()} | {"_info.json"}
    assert set(os.listdir(shard_dir)) == expected  # no temporary file or folder left


def test_the_splits_names_selection_and_defaults_are_the_source_datasets(shard_dir: str) -> None:
    args = train.parse_args(["--dataset", "wds", "--data-dir", shard_dir])
    digits = train.parse_args(["--dataset", "digits"])
    assert (args.val_split, args.img_size, args.reprob, args.hflip, args.crop_scales) == \
        (digits.val_split, digits.img_size, digits.reprob, digits.hflip, digits.crop_scales)
    assert DATASETS["wds"].own_split(shard_dir, "train") == "trainval"
    assert build_dataset("wds", shard_dir, "trainval").name == "wds:trainval"  # the own name works too


def test_converting_a_split_again_replaces_its_shards_and_keeps_the_others(tiny_digits: str, tmp_path) -> None:
    out = str(tmp_path / "s")
    convert(tiny_digits, out, "test")
    convert(tiny_digits, out, "val")
    before = open(os.path.join(out, "val-labels.npz"), "rb").read()
    shards.main(["--dataset", "digits", "--data-dir", tiny_digits, *DIGITS_FLAGS, "--split", "test", "--out", out,
                 "--shard-size", "100", "--no-progress"])
    assert sorted(os.listdir(out)) == ["_info.json", "test-000000.tar", "test-labels.npz", "val-000000.tar",
                                       "val-labels.npz"]
    assert [s["nsamples"] for s in read_info(out)["splits"]["test"]["shards"]] == [40]
    assert open(os.path.join(out, "val-labels.npz"), "rb").read() == before
    assert len(build_dataset("wds", out, "test")) == 40


def test_resize_reencodes_larger_images_as_jpegs_of_that_shortest_side(tiny_digits: str, tmp_path) -> None:
    out = str(tmp_path / "s")
    convert(tiny_digits, out, "val", "--resize", "40")
    folder, sharded = folder_split(tiny_digits, "val"), build_dataset("wds", out, "val")
    records = tar_records(os.path.join(out, "val-000000.tar"))
    assert all(set(record) == {"jpg", "json"} for record in records.values())
    for index, sample in enumerate(folder.samples):
        original, got = read_image(sample.path), sharded.read(sharded.samples[index])
        assert min(original.shape[1:]) > 40 and min(got.shape[1:]) == 40
        expected = F.resize(original, [40], antialias=True)
        assert got.shape == expected.shape
        psnr = 10 * torch.log10(255**2 / (got.float() - expected.float()).square().mean())
        assert psnr > 30  # a JPEG of quality 95 of that resize (32-36 dB on these cluttered scenes)


def test_a_failing_conversion_leaves_no_shard_and_no_info(tiny_digits: str, tmp_path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after two shards of trainval were written: a new folder stays empty, and a folder that held a split
    keeps exactly its files, _info.json included."""
    fresh, merged = str(tmp_path / "fresh"), str(tmp_path / "merged")
    convert(tiny_digits, merged, "test")
    before = {name: open(os.path.join(merged, name), "rb").read() for name in os.listdir(merged)}
    real, calls = shards.image_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * SHARD_SIZE + 3:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "image_file", failing)
    for out in (fresh, merged):
        calls.clear()
        with pytest.raises(OSError, match="No space left"):
            convert(tiny_digits, out, "train")
    assert os.listdir(fresh) == []
    assert {name: open(os.path.join(merged, name), "rb").read() for name in os.listdir(merged)} == before


def test_a_corrupt_source_image_stops_a_resizing_conversion_naming_the_file(corrupt_shards: tuple[str, str, str],
                                                                           tmp_path) -> None:
    root, _, image = corrupt_shards
    with pytest.raises(CorruptImageError, match=image):
        convert(root, str(tmp_path / "s"), "train", "--resize", "40")
    assert os.listdir(tmp_path / "s") == []


def test_bad_flags_and_a_folder_of_another_dataset_are_refused(shard_dir: str, tiny_digits: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match="--shard-size"):
        convert(tiny_digits, str(tmp_path / "a"), "test", "--shard-size", "0")
    with pytest.raises(ConfigError, match="--resize"):
        convert(tiny_digits, str(tmp_path / "a"), "test", "--resize", "0")
    other = str(tmp_path / "other")
    shutil.copytree(shard_dir, other)
    csv_set = tmp_path / "csv"
    csv_set.mkdir()
    image = folder_split(tiny_digits, "test").samples[0].path
    (csv_set / "train.csv").write_text(f"image,labels\n{image},one\n")
    with pytest.raises(DatasetError, match=rf"{other}/_info.json holds splits of another dataset \(classes, source"):
        shards.main(["--dataset", "csv", "--data-dir", str(csv_set), "--split", "train", "--out", other,
                     "--no-progress"])
    assert sorted(os.listdir(other)) == sorted(os.listdir(shard_dir))
    with pytest.raises(SystemExit):
        shards.main(["--dataset", "digits", "--out", other])  # no --split


# ---------------------------------------------------------------- reading


def test_images_read_as_encoded_bytes_name_shard_and_key(shard_dir: str, tiny_digits: str) -> None:
    sharded, folder = build_dataset("wds", shard_dir, "test"), folder_split(tiny_digits, "test")
    sharded.encoded = True
    item = sharded.read(sharded.samples[35])
    assert isinstance(item, EncodedImage) and item.path == os.path.join(shard_dir, "test-000001.tar#000000035")
    assert item.data.numpy().tobytes() == open(folder.samples[35].path, "rb").read()


def test_shards_are_opened_on_first_read_kept_a_few_at_a_time_and_not_pickled(shard_dir: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wds, "OPEN_SHARDS", 2)
    dataset = build_dataset("wds", shard_dir, "train")
    assert dataset._open == {}
    for index in (0, 30, 60, 31):
        dataset[index]
    assert list(dataset._open) == [os.path.join(shard_dir, f"trainval-00000{n}.tar") for n in (2, 1)]
    _, held = hold_out(dataset, 0.1, 0)
    assert isinstance(held, ShardDataset) and held._open == {} and dataset._open  # copies open their own
    assert torch.equal(held[0][0], dataset[dataset.samples.image_ids().index(held.samples[0].image_id)][0])


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "swapped shards", "no info", "no split",
                                    "another split's label index"])
def test_bad_shards_are_errors_naming_the_file(shard_dir: str, tmp_path, damage: str) -> None:
    out = str(tmp_path / "s")
    shutil.copytree(shard_dir, out)
    shard = os.path.join(out, "trainval-000001.tar")
    if damage == "missing shard":
        os.remove(shard)
        with pytest.raises(DatasetError, match=f"{shard}: a shard of split trainval .* is missing"):
            build_dataset("wds", out, "train")
        return
    if damage == "no info":
        os.remove(os.path.join(out, "_info.json"))
        with pytest.raises(DatasetError, match=f"{out}/_info.json does not exist"):
            build_dataset("wds", out, "train")
        return
    if damage == "another split's label index":
        index = os.path.join(out, "trainval-labels.npz")
        shutil.copy(os.path.join(out, "test-labels.npz"), index)
        with pytest.raises(DatasetError, match=f"{index}: holds .*'image ids': 40.*_info.json 96 records"):
            build_dataset("wds", out, "train")
        return
    if damage == "no split":
        with pytest.raises(DatasetError, match=r"has no split 'holdout' \(it has test, trainval, val\): write it"):
            build_dataset("wds", out, "holdout")
        return
    if damage == "truncated shard":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2 + 100])
        expected = f"{shard}: (holds .* records, _info.json says 30|not a readable tar shard)"
    else:  # another shard of as many records in its place: the keys tell
        shutil.copy(os.path.join(out, "trainval-000000.tar"), shard)
        expected = rf"{shard}#000000030: the shard holds key 000000000"
    dataset = build_dataset("wds", out, "train")  # listing reads no tar
    dataset[0]
    with pytest.raises(DatasetError, match=expected):
        dataset[30]


@pytest.fixture(scope="module")
def corrupt_shards(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(a tiny digits copy whose 36th trainval image is a truncated JPEG, its train split as shards, that image)."""
    root = str(tmp_path_factory.mktemp("corrupt") / "digits")
    copy_digits(tiny_digits, root)
    image = folder_split(root, "train").samples[35].path
    data = open(image, "rb").read()
    open(image, "wb").write(data[: len(data) // 2])
    out = str(tmp_path_factory.mktemp("corrupt_shards"))
    for split in SPLITS:
        convert(root, out, split)
    return root, out, image


def test_a_corrupt_image_in_a_shard_is_named_by_shard_and_key_and_skip_corrupt_leaves_it_out(
        corrupt_shards: tuple[str, str, str]) -> None:
    _, out, _ = corrupt_shards
    assert_corrupt_image_is_named_and_skipped(build_dataset("wds", out, "train"), 35,
                                              os.path.join(out, "trainval-000001.tar#000000035"))


# ---------------------------------------------------------------- evaluation, training, processes


@pytest.mark.slow
def test_validate_on_shards_gives_the_folders_metrics_exactly(tiny_checkpoint: str, tiny_digits: str,
                                                             shard_dir: str) -> None:
    flags = ["--checkpoint", tiny_checkpoint, "--workers", "0", "--no-progress"]
    folder = validate.main([*flags, "--data-dir", tiny_digits, *DIGITS_FLAGS])
    sharded = validate.main([*flags, "--dataset", "wds", "--data-dir", shard_dir])
    for name in METRIC_NAMES:
        assert sharded[name] == folder[name] or (math.isnan(sharded[name]) and math.isnan(folder[name])), name
    assert sharded["num_images"] == TINY_DIGITS["num_test"]


READ_EPOCH = '''
"""Each process reads one epoch of each shard split named, through a training and an evaluation loader of two
workers each, and writes the indices it got."""
import json, os, sys

from accelerate import Accelerator

from udtimm.data import build_dataset
from udtimm.data.loader import make_loader, seed_loader
from udtimm.data.transforms import eval_pixels

root, out, batch_size, splits = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
accelerator = Accelerator()
read = {}
for split in splits:
    for mode in ("train", "eval"):
        dataset = build_dataset("wds", root, split, transform=eval_pixels(32))
        loader = accelerator.prepare(make_loader(dataset, batch_size, mode == "train", workers=2))
        if mode == "train":
            seed_loader(loader, 0)
        read[f"{split} {mode}"] = [index for _, _, _, indices in loader for index in indices.tolist()]
        read[f"{split} {mode} opened here"] = len(dataset._open)
with open(os.path.join(out, f"{accelerator.process_index}.json"), "w") as handle:
    json.dump(read, handle)
'''


@pytest.mark.slow
def test_two_processes_of_two_workers_read_the_split_once_and_pad_when_it_does_not_divide(
        shard_dir: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """96 trainval images in batches of 16 over 2 processes divide evenly: each image once, in training and in
    evaluation. 40 test images do not: training drops the last partial round of batches (8 images, other ones each
    epoch), evaluation pads the last batches with the split's first images (engine.predict's gather drops them).
    The workers open the shards: the main processes never do."""
    script, batch_size = tmp_path / "read_epoch.py", 16
    script.write_text(READ_EPOCH)
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = run_two_cpu_processes(str(script), shard_dir, str(tmp_path), str(batch_size), "train", "test",
                                   timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    read = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for split, size in (("train", 96), ("test", 40)):
        assert all(r[f"{split} {mode} opened here"] == 0 for r in read for mode in ("train", "eval"))
        trained, evaluated = (read[0][f"{split} {mode}"] + read[1][f"{split} {mode}"] for mode in ("train", "eval"))
        assert len(set(trained)) == len(trained)  # no image twice in a training epoch
        if split == "train":
            assert size % (2 * batch_size) == 0
            assert sorted(trained) == sorted(evaluated) == list(range(size))
            continue
        rounds = size // (2 * batch_size)
        assert len(trained) == rounds * 2 * batch_size and set(trained) < set(range(size))
        padding = 2 * batch_size * math.ceil(size / (2 * batch_size)) - size
        assert sorted(evaluated) == sorted([*range(size), *range(padding)])


@pytest.fixture(scope="module")
def wds_run(shard_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An uninterrupted train.py run on the shards, with the tiny_checkpoint run's flags."""
    output = str(tmp_path_factory.mktemp("wds_runs"))
    train.main(wds_train_args(shard_dir, output, "--experiment", "whole"))
    return os.path.join(output, "whole")


@pytest.mark.slow
def test_train_py_on_shards_repeats_the_run_on_the_folder_bit_for_bit(wds_run: str, tiny_checkpoint: str) -> None:
    """Same images in the same order, same seeds: the weights of every epoch and the metrics are those of the run
    that read the folder (tiny_checkpoint's run)."""
    assert_repeats_the_folder_run(wds_run, os.path.dirname(tiny_checkpoint), "wds")


@pytest.mark.slow
def test_an_interrupted_run_on_shards_resumes_to_the_same_weights(wds_run: str, shard_dir: str, tmp_path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    stopped_and_resumed(wds_train_args(shard_dir, str(tmp_path), "--experiment", "stopped"),
                        str(tmp_path / "stopped"), monkeypatch)
    assert_same_run(str(tmp_path / "stopped"), wds_run)


@pytest.mark.slow
def test_two_processes_train_on_shards_and_validate_py_on_shards_gives_their_metrics(shard_dir: str,
                                                                                   tmp_path) -> None:
    result = run_two_cpu_processes("train.py", *wds_train_args(shard_dir, str(tmp_path), "--experiment", "ddp",
                                                               "--workers", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    (row,) = read_rows(str(tmp_path / "ddp" / "results.csv"))
    alone = validate.main(["--checkpoint", str(tmp_path / "ddp" / "best.safetensors"), "--data-dir", shard_dir,
                           "--workers", "0", "--no-progress"])  # the checkpoint names its dataset: wds
    assert float(row["num_images"]) == alone["num_images"] == TINY_DIGITS["num_test"]
    for name in METRIC_NAMES:  # another batch split: float32 noise only
        assert float(row[name]) == pytest.approx(alone[name], rel=0, abs=1e-6, nan_ok=True), name


@pytest.mark.slow
def test_skip_corrupt_trains_on_shards_without_the_corrupt_image(corrupt_shards: tuple[str, str, str],
                                                                 tmp_path) -> None:
    _, out, _ = corrupt_shards
    train.main(wds_train_args(out, str(tmp_path), "--epochs", "1", "--skip-corrupt", "--experiment", "s"))
    (row,) = read_rows(str(tmp_path / "s" / "summary.csv"))
    assert row["skipped_images"] == "1"
