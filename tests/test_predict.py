"""predict.py: folders, files and globs to CSV or JSON, --topk and --threshold, bad inputs as clear errors."""

import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OPENIMAGES_CLASSES
from PIL import Image

import predict
from udtimm import Predictor, cli
from udtimm.config import ConfigError
from udtimm.data.base import CorruptImageError, DatasetError


@pytest.fixture(scope="module")
def photos(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """a.jpg, b.jpg and more/c.jpg: three digits scenes."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    source = os.path.join(tiny_digits, "VOC2007", "JPEGImages")
    for name, target in zip(sorted(os.listdir(source))[:3], ("a.jpg", "b.jpg", "more/c.jpg"), strict=True):
        shutil.copy(os.path.join(source, name), folder / target)
    return str(folder)


def run(checkpoint: str, *flags: str) -> pd.DataFrame:
    return predict.main(["--checkpoint", checkpoint, "--workers", "0", "--no-progress", *flags])


def test_folder_to_csv_as_the_predictor_labels_it(tiny_checkpoint: str, photos: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "predictions.csv")
    table = run(tiny_checkpoint, photos, "--out", out, "--threshold", "0.45")
    names = [os.path.join(photos, name) for name in ("a.jpg", "b.jpg", "more/c.jpg")]
    written = pd.read_csv(out, keep_default_na=False)
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    assert list(written.columns) == ["image", "labels", *predictor.class_names]
    assert written["image"].tolist() == names
    expected = predictor.predict(names, threshold=0.45)
    assert written["labels"].tolist() == expected["labels"].tolist() == table["labels"].tolist()
    # The CSV holds the float32 probabilities exactly.
    assert torch.equal(torch.tensor(written[predictor.class_names].to_numpy(), dtype=torch.float32),
                       torch.tensor(expected[predictor.class_names].to_numpy()))
    printed = capsys.readouterr().out
    assert f"3 image(s) labelled with threshold 0.45: {out}" in printed and "more/c.jpg" in printed


def test_files_and_globs_to_json_with_topk(tiny_checkpoint: str, photos: str, tmp_path) -> None:
    out = str(tmp_path / "predictions.json")
    run(tiny_checkpoint, os.path.join(photos, "b.jpg"), os.path.join(photos, "**", "c.jpg"), "--out", out,
        "--topk", "2", "--threshold", "0", "-b", "1")
    records = json.loads(open(out).read())
    assert [record["image"] for record in records] == [os.path.join(photos, "b.jpg"),
                                                       os.path.join(photos, "more", "c.jpg")]
    expected = Predictor.from_checkpoint(tiny_checkpoint).predict([record["image"] for record in records], batch_size=1)
    for record, scores in zip(records, expected.iloc[:, 2:].to_numpy(), strict=True):
        assert np.array_equal(np.array(list(record["scores"].values()), dtype=np.float32), scores)  # exact float32
        ranked = sorted(record["scores"], key=record["scores"].get, reverse=True)  # the two most probable classes
        assert len(record["scores"]) == 10 and set(record["labels"]) == set(ranked[:2])


def test_a_folder_of_mixed_formats_gives_a_row_per_image_and_names_what_it_left_out(
        tiny_checkpoint: str, photos: str, tmp_path, caplog) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(os.path.join(photos, "a.jpg"), folder / "a.jpg")
    scene = Image.open(os.path.join(photos, "b.jpg"))
    Image.fromarray(np.asarray(scene.convert("L")).astype(np.uint16) * 257).save(folder / "gray16.png")
    for name in ("scan.bmp", "scan.tif", "anim.gif", "photo.webp", "photo.ppm"):
        scene.save(folder / name)
    (folder / "notes.txt").write_text("taken on Tuesday")
    (folder / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # PIL identifies HDF5 but cannot decode it
    with caplog.at_level(logging.WARNING):
        table = run(tiny_checkpoint, str(folder), "--out", str(tmp_path / "mixed.csv"))
    images = ["a.jpg", "anim.gif", "gray16.png", "photo.ppm", "photo.webp", "scan.bmp", "scan.tif"]
    assert table["image"].tolist() == [str(folder / name) for name in images]
    assert caplog.messages == [f"left out 2 file(s) of {folder}, whose extensions are not those of an image format: "
                               "model.h5, notes.txt"]


def test_progress_bar_and_error_messages(tiny_checkpoint: str, photos: str, tmp_path, capsys) -> None:
    predict.main(["--checkpoint", tiny_checkpoint, "--workers", "0", photos, "--out", str(tmp_path / "p.csv")])
    assert "predict: 100%" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: .*missing.jpg is neither an image file nor a folder"):
        cli.run_script(lambda: run(tiny_checkpoint, str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "o.csv")))


def test_bad_inputs_and_flags_are_clear_errors(tiny_checkpoint: str, photos: str, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "o.csv")]
    cases = [
        ([photos, str(tmp_path / "missing.jpg"), *out], DatasetError, "missing.jpg"),
        ([photos, str(tmp_path / "notes.txt"), *out], CorruptImageError, "notes.txt is not an image"),
        ([str(tmp_path / "empty"), *out], DatasetError, "no image files in .*empty"),
        ([photos, "--out", str(tmp_path / "o.txt")], ConfigError, r"must end in \.csv or \.json"),
        ([photos, *out, "--topk", "0"], ConfigError, "--topk must be at least 1"),
        ([photos, *out, "--threshold", "1.5"], ConfigError, r"--threshold must lie in \[0, 1\]"),
    ]
    for flags, error, message in cases:
        with pytest.raises(error, match=message):
            run(tiny_checkpoint, *flags)
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.slow
def test_ten_thousand_classes_write_and_print_the_predicted_ones_only(many_classes_checkpoint: str, tmp_path,
                                                                     capsys) -> None:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    out = str(tmp_path / "predictions.csv")
    table = run(many_classes_checkpoint, str(tmp_path), "--out", out)  # --scores auto: predicted above 100 classes
    written = pd.read_csv(out, keep_default_na=False)
    assert list(written.columns) == ["image", "labels", "scores"] and len(written) == 2
    predictor = Predictor.from_checkpoint(many_classes_checkpoint)
    every = predictor.predict([str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    assert written["labels"].tolist() == every["labels"].tolist() == table["labels"].tolist()
    counts = written["labels"].str.count(";") + 1
    assert counts.min() > predict.PREVIEW_LABELS  # a random model of 10,000 classes predicts thousands
    printed = capsys.readouterr().out.splitlines()
    preview = [line for line in printed if line.startswith(str(tmp_path))]
    assert [line.split()[-2:] for line in preview] == [[f"{count - predict.PREVIEW_LABELS:,}", "more"]
                                                       for count in counts]
    assert max(len(line) for line in printed) < 400
    assert printed[-1].endswith(f"with the probabilities of the predicted classes only: {out}")

    top = str(tmp_path / "top.json")
    run(many_classes_checkpoint, str(tmp_path / "a.png"), "--out", top, "--topk", "5", "--threshold", "0")
    (record,) = json.loads(open(top).read())
    ranked = every.iloc[0][predictor.class_names].astype(np.float32).sort_values(ascending=False, kind="stable")
    assert set(record["labels"]) == set(record["scores"]) == set(ranked.index[:5])
    assert [np.float32(record["scores"][name]) for name in record["labels"]] == [
        np.float32(every.iloc[0][name]) for name in record["labels"]]  # exact float32, as in "all"

    everything = run(many_classes_checkpoint, str(tmp_path / "b.png"), "--out", str(tmp_path / "all.csv"),
                     "--scores", "all")
    assert everything.shape == (1, 2 + OPENIMAGES_CLASSES)
    assert len(pd.read_csv(tmp_path / "all.csv").columns) == 2 + OPENIMAGES_CLASSES
