"""--dataset hf (udtimm/data/hf.py): the tiny digits set written as Hugging Face datasets (Parquet, save_to_disk)
gives the folder's labels, pixels and metrics; class names from ClassLabel, from names or from a file; bad rows and
images named by split and row; pickling to loader workers; the flags; the shard converter."""

import math
import os
import pickle
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    TINY_DIGITS,
    assert_corrupt_image_is_named_and_skipped,
    assert_repeats_the_folder_run,
    tiny_train_args,
)
from torchvision.transforms.v2 import functional as F

import train
import validate
from udtimm import data_flags
from udtimm.data import DATASETS, build_dataset, shards
from udtimm.data.base import CorruptImageError, DatasetError, EncodedImage, Label, hold_out
from udtimm.data.hf import HfDataset
from udtimm.data.loader import make_loader
from udtimm.errors import ConfigError
from udtimm.metrics import METRIC_NAMES

SPLITS = {"train": "train", "val": "validation", "test": "test"}  # generic name -> the Hub-style name written
# The digits folder's settings that train.py gives digits by default, and the paper's recipe any other dataset.
DIGITS_DEFAULTS = ("--reprob", "0", "--hflip", "0", "--crop-scales", "1.0", "0.875")


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """datasets writes the Arrow copy of each Parquet file it loads into its cache: a temporary one here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
        yield


def folder_split(tiny_digits: str, split: str):
    return build_dataset("digits", tiny_digits, split, **TINY_DIGITS)


def digits_rows(tiny_digits: str, split: str, names: bool = False) -> dict[str, list]:
    """A digits split as columns: id, image ({"bytes": the file, "path": its name}), labels and difficult (the
    present and the difficult classes, as ids or, with `names`, as class names)."""
    folder = folder_split(tiny_digits, split)
    rows: dict[str, list] = {"id": [], "image": [], "labels": [], "difficult": []}
    for sample in folder.samples:
        rows["id"].append(sample.image_id)
        rows["image"].append({"bytes": open(sample.path, "rb").read(), "path": os.path.basename(sample.path)})
        for column, state in (("labels", Label.PRESENT), ("difficult", Label.DIFFICULT)):
            ids = [int(c) for c, s in sample.labels if s == state]
            rows[column].append([folder.classes[c] for c in ids] if names else ids)
    return rows


def digits_features(classes: list[str]):
    class_ids = datasets.List(datasets.ClassLabel(names=classes))
    return datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(), "labels": class_ids,
                              "difficult": class_ids})


def digits_dict(tiny_digits: str):
    """The three splits of the tiny digits set as a DatasetDict with ClassLabel labels, Hub split names."""
    classes = folder_split(tiny_digits, "test").classes
    return datasets.DatasetDict({own: datasets.Dataset.from_dict(digits_rows(tiny_digits, split),
                                                                 features=digits_features(classes))
                                 for split, own in SPLITS.items()})


@pytest.fixture(scope="module")
def parquet_dir(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny digits set as <split>.parquet files (train, validation, test), written by datasets."""
    out = tmp_path_factory.mktemp("hf") / "parquet"
    out.mkdir()
    for own, split in digits_dict(tiny_digits).items():
        split.to_parquet(str(out / f"{own}.parquet"))
    return str(out)


def write_named_parquet(tiny_digits: str, out, splits=("train", "test")) -> str:
    """The splits as Parquet files written by pyarrow alone (no datasets metadata): labels as class names, the
    image as a {bytes, path} struct."""
    out.mkdir()
    for split in splits:
        pq.write_table(pa.table(digits_rows(tiny_digits, split, names=True)), str(out / f"{SPLITS[split]}.parquet"))
    return str(out)


def assert_same_labels(got, want, by_name: bool = False) -> None:
    assert [s.image_id for s in got.samples] == [s.image_id for s in want.samples]
    if not by_name:
        assert got.classes == want.classes and got.unlisted == want.unlisted
        assert all(np.array_equal(a.labels, b.labels) for a, b in zip(got.samples, want.samples, strict=True))
        return
    for a, b in zip(got.samples, want.samples, strict=True):
        assert {got.classes[c]: s for c, s in a.labels.tolist()} == {want.classes[c]: s for c, s in b.labels.tolist()}


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("split", SPLITS)
def test_every_split_gives_the_folders_labels_and_pixels(parquet_dir: str, tiny_digits: str, split: str) -> None:
    folder, hf = folder_split(tiny_digits, split), build_dataset("hf", parquet_dir, split)
    assert isinstance(hf, HfDataset) and hf.name == f"hf:{SPLITS[split]}"
    assert_same_labels(hf, folder)
    for index in range(len(folder)):  # pixels, targets and difficult masks, through the dataset
        assert all(torch.equal(a, b) for a, b in zip(hf[index][:3], folder[index][:3], strict=True)), index
    assert hf.samples[5].path == f"{parquet_dir}:{SPLITS[split]}#5"


def test_a_save_to_disk_folder_and_a_parquet_file_read_the_same(parquet_dir: str, tiny_digits: str,
                                                                tmp_path) -> None:
    saved = str(tmp_path / "saved")
    digits_dict(tiny_digits).save_to_disk(saved)
    single = os.path.join(parquet_dir, "test.parquet")  # one file: one split, named train
    for root, split, name, digits_split in ((saved, "test", "test", "test"), (saved, "val", "validation", "val"),
                                            (single, "train", "train", "test")):
        hf, folder = build_dataset("hf", root, split), folder_split(tiny_digits, digits_split)
        assert hf.name == f"hf:{name}"
        assert_same_labels(hf, folder)
        assert torch.equal(hf[7][0], folder[7][0])


def test_images_kept_as_file_paths_are_read_from_their_files(tiny_digits: str, tmp_path) -> None:
    folder = folder_split(tiny_digits, "test")
    (tmp_path / "images").mkdir()
    paths = [str(tmp_path / "images" / os.path.basename(s.path)) for s in folder.samples]
    for sample, path in zip(folder.samples, paths, strict=True):
        open(path, "wb").write(open(sample.path, "rb").read())
    rows = {"image": paths, "labels": digits_rows(tiny_digits, "test")["labels"]}
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.List(datasets.ClassLabel(names=folder.classes))})
    # to_parquet keeps an Image made from files as their paths (save_to_disk would copy the files in).
    saved = str(tmp_path / "paths.parquet")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(saved)
    assert pq.read_table(saved).column("image")[0].as_py() == {"bytes": None, "path": paths[0]}
    hf = build_dataset("hf", saved, "train")
    assert [s.image_id for s in hf.samples] == [str(row) for row in range(len(folder))]  # no id column: row numbers
    assert all(torch.equal(hf.read(a), folder.read(b)) for a, b in zip(hf.samples, folder.samples, strict=True))
    os.remove(paths[3])
    with pytest.raises(CorruptImageError, match=rf"cannot read image {saved}:train#3 \(file {paths[3]}\): "):
        hf[3]


def test_class_names_are_the_sorted_names_of_the_train_split_for_every_split(tiny_digits: str, tmp_path) -> None:
    root = write_named_parquet(tiny_digits, tmp_path / "named")
    for split in ("train", "test"):
        hf, folder = build_dataset("hf", root, split), folder_split(tiny_digits, split)
        assert hf.classes == sorted(folder.classes)
        assert_same_labels(hf, folder, by_name=True)
        assert torch.equal(hf[0][0], folder[0][0])  # a {bytes, path} struct without datasets' metadata is an image
    # A test split that names fewer classes still has the train split's list.
    test = pa.table(digits_rows(tiny_digits, "test", names=True)).slice(0, 1)
    pq.write_table(test, str(tmp_path / "named" / "test.parquet"))
    assert build_dataset("hf", root, "test").classes == sorted(folder.classes)


def test_class_ids_need_classlabel_names_or_a_classes_file(tiny_digits: str, tmp_path) -> None:
    (tmp_path / "ids").mkdir()
    rows = digits_rows(tiny_digits, "test")  # ids, without ClassLabel names
    pq.write_table(pa.table(rows), str(tmp_path / "ids" / "train.parquet"))
    with pytest.raises(DatasetError, match=r"ids:train#0: class id \d in column 'labels', which has no ClassLabel "
                                           r"names: give them with --hf-classes FILE"):
        build_dataset("hf", str(tmp_path / "ids"), "train")
    classes = folder_split(tiny_digits, "test").classes
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    hf = build_dataset("hf", str(tmp_path / "ids"), "train", classes=str(tmp_path / "classes.txt"))
    assert_same_labels(hf, folder_split(tiny_digits, "test"))
    (tmp_path / "classes.txt").write_text("\n".join(classes[:5]) + "\n")
    with pytest.raises(DatasetError, match=r"ids:train#\d+: class id \d in column '(labels|difficult)', expected 0 "
                                           r"to 4 \(5 classes\)"):
        build_dataset("hf", str(tmp_path / "ids"), "train", classes=str(tmp_path / "classes.txt"))


def test_unknown_and_negatives_columns_and_unlisted_unknown(tiny_digits: str, tmp_path) -> None:
    """OpenImages-style rows: verified positives and negatives, every other class unknown."""
    (tmp_path / "oi").mkdir()
    table = pa.table({"image": digits_rows(tiny_digits, "val")["image"][:3], "pos": [["one"], ["two"], []],
                      "neg": [["two", "three"], [], ["one"]], "unknown": [[], ["one"], []]})
    pq.write_table(table, str(tmp_path / "oi" / "train.parquet"))
    hf = build_dataset("hf", str(tmp_path / "oi"), "train", labels_column="pos", negatives_column="neg",
                       unlisted="unknown")
    assert hf.classes == ["one", "three", "two"] and hf.unlisted == "unknown"
    states = [{hf.classes[c]: Label(s) for c, s in sample.labels.tolist()} for sample in hf.samples]
    assert states == [{"one": Label.PRESENT, "two": Label.ABSENT, "three": Label.ABSENT}, {"two": Label.PRESENT},
                      {"one": Label.ABSENT}]  # the unknown column, read by its default name, adds nothing here
    absent = build_dataset("hf", str(tmp_path / "oi"), "train", labels_column="pos", negatives_column="neg")
    assert [{absent.classes[c]: Label(s) for c, s in sample.labels.tolist()} for sample in absent.samples] == \
        [{"one": Label.PRESENT}, {"one": Label.UNKNOWN, "two": Label.PRESENT}, {}]
    table = table.set_column(2, "neg", pa.array([["one"], [], []]))
    pq.write_table(table, str(tmp_path / "oi" / "train.parquet"))
    with pytest.raises(DatasetError, match=r"oi:train#0: class 'one' is listed in column 'neg' and also in column "
                                           r"'pos'"):
        build_dataset("hf", str(tmp_path / "oi"), "train", labels_column="pos", negatives_column="neg")


def test_a_bad_row_is_refused_at_load_naming_its_split_and_row(tiny_digits: str, tmp_path) -> None:
    root = write_named_parquet(tiny_digits, tmp_path / "bad")
    rows = digits_rows(tiny_digits, "test", names=True)
    rows["labels"][17] = ["one", "eleven"]
    pq.write_table(pa.table(rows), os.path.join(root, "test.parquet"))
    build_dataset("hf", root, "train")  # the other split loads
    with pytest.raises(DatasetError, match=rf"{root}:test#17: unknown class 'eleven' in column 'labels'; known "
                                           "classes: eight, five"):
        build_dataset("hf", root, "test")
    rows["labels"][17], rows["id"][30] = ["one"], rows["id"][2]
    pq.write_table(pa.table(rows), os.path.join(root, "test.parquet"))
    with pytest.raises(DatasetError, match=rf"{root}:test, column 'id': image id '{rows['id'][2]}' is listed twice"):
        build_dataset("hf", root, "test")


def test_a_missing_split_column_or_dataset_is_named(parquet_dir: str, tiny_digits: str, tmp_path) -> None:
    with pytest.raises(DatasetError, match=rf"{parquet_dir} has no split 'holdout' \(it has test, train, "
                                           r"validation\)"):
        build_dataset("hf", parquet_dir, "holdout")
    with pytest.raises(DatasetError, match=r"parquet:test: no column 'tags' \(--hf-labels-column\); its columns: id, "
                                           "image, labels, difficult"):
        build_dataset("hf", parquet_dir, "test", labels_column="tags")
    with pytest.raises(DatasetError, match=r"no column 'img' \(--hf-image-column\)"):
        build_dataset("hf", parquet_dir, "test", image_column="img")
    with pytest.raises(DatasetError, match=r"column 'labels' \(--hf-image-column\) is List\(ClassLabel.*not images"):
        build_dataset("hf", parquet_dir, "test", image_column="labels")
    table = pa.table({"image": [b"not an image", b""], "labels": [["one"], ["two"]]})  # bytes: decoded when read
    pq.write_table(table, str(tmp_path / "bytes.parquet"))
    raw = build_dataset("hf", str(tmp_path / "bytes.parquet"), "train")
    with pytest.raises(CorruptImageError, match=r"bytes.parquet:train#0: not an image format"):
        raw[0]
    with pytest.raises(CorruptImageError, match=r"bytes.parquet:train#1: the row has no image bytes"):
        raw[1]
    with pytest.raises(DatasetError, match="--data-dir no-such/set .no local folder or file of that name: read as a "
                                           "Hub name.: cannot open it as a Hugging Face dataset"):
        build_dataset("hf", "no-such/set", "test")  # offline (conftest): the Hub is not reached
    single = str(tmp_path / "single")
    datasets.Dataset.from_dict({"labels": [["one"]]}).save_to_disk(single)
    with pytest.raises(DatasetError, match=f"{single}: save_to_disk wrote one Dataset here, without split names"):
        build_dataset("hf", single, "train")


def test_without_the_datasets_package_only_hf_is_refused(parquet_dir: str, tiny_digits: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets then raises ImportError
    with pytest.raises(ConfigError, match=r"--dataset hf reads .* datasets package, which is not installed: pip "
                                          r"install 'datasets>=4.0'"):
        build_dataset("hf", parquet_dir, "test")
    assert len(folder_split(tiny_digits, "test")) == TINY_DIGITS["num_test"]


@pytest.fixture(scope="module")
def corrupt_parquet(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny digits set as Parquet files whose train row 35 holds the first half of its JPEG."""
    out = tmp_path_factory.mktemp("hf_corrupt") / "parquet"
    out.mkdir()
    for own, split in digits_dict(tiny_digits).items():
        if own == "train":
            rows = split.cast_column("image", datasets.Image(decode=False)).to_dict()
            rows["image"][35]["bytes"] = rows["image"][35]["bytes"][: len(rows["image"][35]["bytes"]) // 2]
            split = datasets.Dataset.from_dict(rows, features=split.features)
        split.to_parquet(str(out / f"{own}.parquet"))
    return str(out)


def test_an_undecodable_image_is_named_by_split_and_row_and_skip_corrupt_leaves_it_out(corrupt_parquet: str) -> None:
    dataset = build_dataset("hf", corrupt_parquet, "train")  # loading decodes nothing
    assert_corrupt_image_is_named_and_skipped(dataset, 35, f"{corrupt_parquet}:train#35")


def test_images_read_as_encoded_bytes_are_the_image_files(parquet_dir: str, tiny_digits: str) -> None:
    hf, folder = build_dataset("hf", parquet_dir, "test"), folder_split(tiny_digits, "test")
    hf.encoded = True
    item = hf.read(hf.samples[11])
    assert isinstance(item, EncodedImage) and item.path == f"{parquet_dir}:test#11"
    assert item.data.numpy().tobytes() == open(folder.samples[11].path, "rb").read()


def test_the_dataset_pickles_by_reference_and_two_workers_read_what_the_main_process_does(parquet_dir: str) -> None:
    dataset = build_dataset("hf", parquet_dir, "train")
    image_bytes = sum(len(row["bytes"]) for row in dataset.images["image"])
    copy = pickle.loads(pickle.dumps(dataset))
    # The Arrow files are mapped again, not copied: the pickle holds the samples and file names.
    assert len(pickle.dumps(dataset)) < image_bytes / 10
    assert all(torch.equal(copy[index][0], dataset[index][0]) for index in (0, 50, 95))
    _, held = hold_out(dataset, 0.1, 0)
    row = [s.image_id for s in dataset.samples].index(held.samples[0].image_id)
    assert isinstance(held, HfDataset) and torch.equal(held[0][0], dataset[row][0])
    dataset.transform = lambda image: F.resize(image, [32, 32])
    alone, two = (list(make_loader(dataset, 16, False, workers)) for workers in (0, 2))
    assert len(two) == len(alone) == 6
    for got, want in zip(two, alone, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# ---------------------------------------------------------------- flags, selection, shards


def test_flags_reach_the_loader_only_when_set_and_val_chooses(parquet_dir: str, capsys) -> None:
    args = train.parse_args(["--dataset", "hf", "--data-dir", parquet_dir])
    assert args.val_split == "val" and DATASETS["hf"].own_split(parquet_dir, "val") == "validation"
    assert data_flags.data_source(args).options == {}  # an older run's provenance is unchanged
    args = train.parse_args(["--dataset", "hf", "--data-dir", parquet_dir, "--hf-labels-column", "tags",
                             "--hf-unlisted", "unknown", "--hf-classes", "c.txt"])
    assert data_flags.data_source(args).options == {"labels_column": "tags", "classes": "c.txt", "unlisted": "unknown"}
    assert data_flags.data_source(train.parse_args(["--hf-image-column", "img"])).options["seed"] == 0
    assert "warning: --hf-image-column does nothing: --dataset digits is not hf" in capsys.readouterr().err
    no_validation = os.path.join(parquet_dir, "test.parquet")  # a single file: its one split is train
    assert train.parse_args(["--dataset", "hf", "--data-dir", no_validation]).val_split == "holdout"


def test_the_shard_converter_takes_an_hf_dataset(parquet_dir: str, tiny_digits: str, tmp_path) -> None:
    out = str(tmp_path / "shards")
    shards.main(["--dataset", "hf", "--data-dir", parquet_dir, "--split", "val", "--out", out, "--no-progress"])
    sharded, folder = build_dataset("wds", out, "val"), folder_split(tiny_digits, "val")
    assert sharded.name == "wds:validation"
    assert_same_labels(sharded, folder)
    assert all(torch.equal(sharded[index][0], folder[index][0]) for index in range(len(folder)))


# ---------------------------------------------------------------- training and evaluation


@pytest.mark.slow
def test_train_py_on_an_hf_dataset_repeats_the_run_on_the_folder(parquet_dir: str, tiny_checkpoint: str,
                                                                 tmp_path) -> None:
    """Same images in the same order, same labels, same seeds: the weights and metrics of the folder's run
    (tiny_checkpoint's), given the digits defaults that --dataset digits sets by itself."""
    args = tiny_train_args(parquet_dir, str(tmp_path), "--experiment", "hf", *DIGITS_DEFAULTS)
    args[args.index("digits")] = "hf"
    train.main(args)
    assert_repeats_the_folder_run(str(tmp_path / "hf"), os.path.dirname(tiny_checkpoint), "hf")


@pytest.mark.slow
def test_validate_on_an_hf_dataset_gives_the_folders_metrics_exactly(tiny_checkpoint: str, tiny_digits: str,
                                                                     parquet_dir: str) -> None:
    flags = ["--checkpoint", tiny_checkpoint, "--workers", "0", "--no-progress"]
    folder = validate.main([*flags, "--data-dir", tiny_digits, "--digits-trainval", "96", "--digits-test", "40"])
    hf = validate.main([*flags, "--dataset", "hf", "--data-dir", parquet_dir])
    for name in METRIC_NAMES:
        assert hf[name] == folder[name] or (math.isnan(hf[name]) and math.isnan(folder[name])), name
    assert hf["num_images"] == TINY_DIGITS["num_test"]
