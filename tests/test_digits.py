"""The embedded digits generator: determinism, VOC layout, difficulty rate, concurrent generation."""

import hashlib
import multiprocessing
import os
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import VOCDetection

from udtimm.data import DatasetError, build_dataset, default_data_dir
from udtimm.data import digits as digits_module
from udtimm.data.digits import DIGIT_CLASSES, ensure_digits
from udtimm.data.voc import load_voc

SMALL = {"num_trainval": 40, "num_test": 20}


def tree_hashes(root):
    """Relative path -> sha256 of every file under `root`."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ensure_digits(str(tmp_path_factory.mktemp("digits") / "digits"), **SMALL)


def test_deterministic(small, tmp_path):
    again = ensure_digits(str(tmp_path / "again"), **SMALL)
    hashes = tree_hashes(small)
    assert len(hashes) == 2 * 60 + 3 + 1  # jpg + xml per image, classes.txt, 2 split files, .complete
    assert hashes == tree_hashes(again)
    assert ensure_digits(small, **SMALL) == small  # already there: nothing rewritten


def test_voc_layout_agrees_with_torchvision(small):
    assert sorted(os.listdir(small)) == [".complete", "VOC2007"]
    for split, n in (("trainval", 40), ("test", 20)):
        samples, classes = load_voc(small, split)
        assert classes == list(DIGIT_CLASSES) and len(samples) == n
        for s in samples:
            annotation = VOCDetection.parse_voc_xml(ET.parse(s.path.replace("JPEGImages", "Annotations")
                                                             .replace(".jpg", ".xml")).getroot())["annotation"]
            objects = annotation["object"]
            assert 1 <= len(objects) <= 4
            easy = {o["name"] for o in objects if o["difficult"] == "0"}
            names = {o["name"] for o in objects}
            target, difficult = s.dense(len(classes))
            assert {classes[i] for i in np.flatnonzero(target)} == names
            assert {classes[i] for i in np.flatnonzero(difficult)} == names - easy
            with Image.open(s.path) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert (str(image.width), str(image.height)) == (annotation["size"]["width"],
                                                                 annotation["size"]["height"])
                assert 64 <= min(image.size) and max(image.size) <= 96
            for o in objects:
                box = [int(o["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")]
                assert 1 <= box[0] <= box[2] <= image.width and 1 <= box[1] <= box[3] <= image.height
                assert o["pose"] == "Unspecified" and o["truncated"] in ("0", "1")


@pytest.mark.slow
def test_difficult_fraction(tmp_path):
    root = ensure_digits(str(tmp_path / "d"), num_trainval=300, num_test=1, seed=1)
    samples, classes = load_voc(root, "trainval")
    flags = [int(o.findtext("difficult")) for s in samples
             for o in ET.parse(s.path.replace("JPEGImages", "Annotations").replace(".jpg", ".xml")).iter("object")]
    assert 0.08 < np.mean(flags) < 0.25, np.mean(flags)
    target = np.stack([s.dense(len(classes))[0] for s in samples])
    difficult = np.stack([s.dense(len(classes))[1] for s in samples])
    assert ((target > 0) & ~difficult).any(1).mean() > 0.9  # nearly every image has an easy digit to learn from
    assert (target.sum(0) > 15).all()  # every class occurs


def generate_together(barrier, root):
    barrier.wait()  # both processes reach ensure_digits at the same moment, after their slow imports
    ensure_digits(root, **SMALL)


@pytest.mark.slow
def test_concurrent_generation(small, tmp_path):
    root = str(tmp_path / "shared" / "digits")
    ctx = multiprocessing.get_context("spawn")  # like two distributed ranks: separate interpreters
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=generate_together, args=(barrier, root)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert tree_hashes(root) == tree_hashes(small)  # one complete dataset, identical to a single-process one
    assert sorted(os.listdir(tmp_path / "shared")) == [".digits.lock", "digits"]  # no temporary left behind


def test_existing_directories(small, tmp_path):
    with pytest.raises(DatasetError, match=r"\.complete: .*generated with .*\"num_test\": 20.*delete it or use an"):
        ensure_digits(small, num_trainval=40, num_test=21)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="is not a complete digits dataset"):
        ensure_digits(str(tmp_path / "other"), **SMALL)
    (tmp_path / "empty").mkdir()  # an empty directory made beforehand is fine
    (tmp_path / ".empty.tmp.12345").mkdir()  # left by a killed generator: cleaned up
    assert tree_hashes(ensure_digits(str(tmp_path / "empty"), **SMALL)) == tree_hashes(small)
    assert not (tmp_path / ".empty.tmp.12345").exists()


def test_build_dataset_and_default_dir(small, monkeypatch, tmp_path):
    monkeypatch.setenv("UDTIMM_CACHE", str(tmp_path / "cache"))
    assert default_data_dir("digits") == str(tmp_path / "cache" / "digits")
    assert default_data_dir("voc2007") is None
    monkeypatch.delenv("UDTIMM_CACHE")
    assert default_data_dir("digits") == os.path.expanduser("~/.cache/udtimm/digits")
    train = build_dataset("digits", small, "train", **SMALL)  # options go to ensure_digits
    test = build_dataset("digits", small, "test", **SMALL)
    assert (train.name, len(train), test.name, len(test)) == ("digits:trainval", 40, "digits:test", 20)
    assert train.classes == list(DIGIT_CLASSES) and train[0][0].shape[0] == 3
    with pytest.raises(DatasetError, match="generated with"):  # the defaults are 3000 + 1000 images
        build_dataset("digits", small, "test")
    with pytest.raises(ValueError, match="needs a data directory"):
        build_dataset("voc2007", None, "train")


def test_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["digits", "--out", str(out), "--num-trainval", "3", "--num-test", "2"])
    digits_module.main()
    assert capsys.readouterr().out.strip() == str(out)
    assert len(load_voc(str(out), "test")[0]) == 2


def test_another_seed_never_uses_a_test_glyph_of_the_default_set(monkeypatch, tmp_path):
    pools = {}
    compose = digits_module._compose

    def recording(rng, glyphs, labels, pool, *rest):
        pools.setdefault(seed, set()).update(pool.tolist())
        return compose(rng, glyphs, labels, pool, *rest)

    monkeypatch.setattr(digits_module, "_compose", recording)
    test_pools = {}
    for seed in (0, 1):
        root = ensure_digits(str(tmp_path / f"seed{seed}"), num_trainval=4, num_test=4, seed=seed)
        test_pools[seed] = hashlib.sha256(open(os.path.join(root, "VOC2007", "JPEGImages", "000001.jpg"), "rb")
                                          .read()).hexdigest()
    order = np.random.default_rng(0).permutation(1797)
    default_test = set(order[:int(1797 * 0.3)].tolist())
    assert pools[0] >= default_test  # seed 0 draws its test scenes from these
    assert not pools[1] & default_test and len(pools[1]) == 1797 - len(default_test)
    assert test_pools[0] != test_pools[1]  # other scenes
    assert default_data_dir("digits", 3000, 500, seed=1).endswith("digits-3000-500-seed1")


def test_val_split_is_added_on_demand_leaving_trainval_and_test_as_they_were(small, tmp_path, monkeypatch):
    root = ensure_digits(str(tmp_path / "d"), **SMALL)
    before = tree_hashes(root)
    pools = []
    compose = digits_module._compose

    def recording(rng, glyphs, labels, pool, *rest):
        pools.append(set(pool.tolist()))
        return compose(rng, glyphs, labels, pool, *rest)

    monkeypatch.setattr(digits_module, "_compose", recording)
    val = build_dataset("digits", root, "val", **SMALL)
    after = tree_hashes(root)
    assert {path: digest for path, digest in after.items() if path in before} == before
    assert len(val) == digits_module.num_val_images(SMALL["num_test"]) == 10 and val.name == "digits:val"
    trainval_ids = {s.image_id for s in build_dataset("digits", root, "train", **SMALL).samples}
    test_ids = {s.image_id for s in build_dataset("digits", root, "test", **SMALL).samples}
    assert not {s.image_id for s in val.samples} & (trainval_ids | test_ids)
    # Composed from the trainval samples only: never a handwritten sample of the test scenes.
    order = np.random.default_rng(0).permutation(1797)
    assert pools and all(pool == set(order[int(1797 * 0.3):].tolist()) for pool in pools)
    # Deterministic, and written once: a dataset generated with its val split at once is the same tree.
    assert tree_hashes(ensure_digits(str(tmp_path / "again"), **SMALL, with_val=True)) == after
    calls = len(pools)
    build_dataset("digits", root, "val", **SMALL)
    assert len(pools) == calls


def test_ambiguous_set_is_a_set_of_its_own_with_more_difficult_digits(small, tmp_path, monkeypatch):
    root = ensure_digits(str(tmp_path / "ambiguous"), **SMALL, ambiguous=True)
    with open(os.path.join(small, ".complete")) as f:
        assert "ambiguous" not in f.read()  # the default set's marker, and so its cache, stay as they were
    with pytest.raises(DatasetError, match="generated with"):
        ensure_digits(root, **SMALL)
    rates = {}
    for name, path in (("default", small), ("ambiguous", root)):
        samples, classes = load_voc(path, "trainval")
        dense = [s.dense(len(classes)) for s in samples]
        rates[name] = sum(difficult.sum() for _, difficult in dense) / sum(target.sum() for target, _ in dense)
    assert rates["ambiguous"] > rates["default"]
    monkeypatch.setenv("UDTIMM_CACHE", str(tmp_path / "cache"))
    assert default_data_dir("digits", ambiguous=True) == str(tmp_path / "cache" / "digits-ambiguous")
    assert default_data_dir("digits", 1500, 1000, 3, True).endswith("digits-1500-1000-seed3-ambiguous")


@pytest.mark.parametrize("degradation", digits_module.DEGRADATIONS)
def test_every_degraded_digit_is_difficult(degradation, monkeypatch):
    monkeypatch.setattr(digits_module, "_DEGRADED_SHARE", 1.0)
    monkeypatch.setattr(digits_module, "DEGRADATIONS", (degradation,))
    glyphs, labels = digits_module._glyphs()
    rng = np.random.default_rng(5)
    for _ in range(10):
        _, objects = digits_module._compose(rng, glyphs, labels, np.arange(len(glyphs)), 64, 96, ambiguous=True)
        assert objects and all(obj["difficult"] for obj in objects)
        if degradation == "tiny":  # ink of at most 10 % of a 96 px side, plus a pixel of upscaling
            assert all(obj["box"][3] - obj["box"][1] + 1 <= 11 for obj in objects)
