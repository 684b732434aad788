"""The embedded digits generator: determinism, VOC layout, difficulty rate, concurrent generation."""

import hashlib
import json
import multiprocessing
import os
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import VOCDetection

import train
from udtimm import data_flags
from udtimm.data import DatasetError, build_dataset, default_data_dir
from udtimm.data import digits as digits_module
from udtimm.data.digits import DIGIT_CLASSES, ensure_digits, long_tail_probabilities
from udtimm.data.voc import load_voc
from udtimm.errors import ConfigError

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


def class_counts(root, split):
    """Number of images of `split` at `root` that hold each class."""
    samples, classes = load_voc(root, split)
    return np.stack([s.dense(len(classes))[0] for s in samples]).astype(bool).sum(0)


def test_the_default_set_is_the_one_written_before_long_tail_existed(small):
    # The annotations of SMALL's trainval and test scenes as the generator wrote them before --digits-long-tail: a
    # default set draws exactly the random numbers it drew, so every cached default set stays valid.
    digest = hashlib.sha256()
    for number in range(1, 61):
        with open(os.path.join(small, "VOC2007", "Annotations", f"{number:06d}.xml"), "rb") as f:
            digest.update(f.read())
    assert digest.hexdigest() == "721fba0e87730a71f2f1c78edcda28ce6d404292d65ab093aef96b29da567c77"
    with open(os.path.join(small, ".complete")) as f:
        assert "long_tail" not in json.load(f)


@pytest.mark.parametrize("ratio", [100, 20, 1.5])
def test_long_tail_probabilities_give_geometric_image_frequencies(ratio):
    p = long_tail_probabilities(ratio)
    # A class is in a scene unless none of its 1-4 digits (probabilities 0.25, 0.35, 0.25, 0.15) is of it.
    frequencies = 1 - ((1 - p[:, None]) ** np.arange(1, 5) * [0.25, 0.35, 0.25, 0.15]).sum(1)
    assert abs(p.sum() - 1) < 1e-9 and (np.diff(p) < 0).all()
    np.testing.assert_allclose(frequencies, frequencies[0] * float(ratio) ** -(np.arange(10) / 9), rtol=0, atol=1e-9)
    np.testing.assert_allclose(digits_module.image_frequencies(p), frequencies, rtol=0, atol=1e-12)
    if ratio == 100:  # the counts docs/datasets.md#digits gives for --digits-trainval 1500
        assert np.round(frequencies * 1500).tolist() == [1084, 650, 390, 234, 140, 84, 50, 30, 18, 11]
        assert 0.47 < p[0] < 0.48 and 0.003 < p[-1] < 0.0035


@pytest.mark.parametrize("ratio", [1, 0.5, -3, float("inf"), float("nan")])
def test_long_tail_ratio_must_exceed_one(ratio, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="--digits-long-tail must be a finite ratio > 1"):
        ensure_digits(str(tmp_path / "d"), **SMALL, long_tail=ratio)
    monkeypatch.setattr(sys, "argv", ["digits", "--out", str(tmp_path / "cli"), "--long-tail", str(ratio)])
    with pytest.raises(SystemExit, match="1"):
        digits_module.main()
    assert "error: --digits-long-tail must be" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # refused before anything is written


def test_long_tailed_trainval_falls_geometrically_while_val_and_test_stay_balanced(tmp_path):
    root = ensure_digits(str(tmp_path / "lt"), num_trainval=300, num_test=200, min_size=16, max_size=24,
                         long_tail=20, with_val=True)
    counts = class_counts(root, "trainval")
    assert counts[0] / counts[-1] > 20 / 4 and counts[:3].sum() > 3 * counts[-3:].sum(), counts
    expected = digits_module.image_frequencies(long_tail_probabilities(20)) * 300
    assert (np.abs(counts - expected) < 4 * np.sqrt(expected) + 2).all(), (counts, expected)
    balanced = class_counts(root, "val") + class_counts(root, "test")
    assert balanced.max() / balanced.min() < 3, balanced  # long-tailed, it would be about 20
    with open(os.path.join(root, ".complete")) as f:
        assert json.load(f)["long_tail"] == 20.0
    with pytest.raises(DatasetError, match="generated with"):  # a set of its own, never taken for a balanced one
        ensure_digits(root, num_trainval=300, num_test=200, min_size=16, max_size=24)


def test_long_tailed_set_gets_a_cache_folder_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("UDTIMM_CACHE", str(tmp_path))
    assert default_data_dir("digits", long_tail=100) == str(tmp_path / "digits-lt100")
    assert default_data_dir("digits", long_tail=20.5) == str(tmp_path / "digits-lt20.5")
    assert default_data_dir("digits", 1500, 1000, 3, True, 100.0) == str(tmp_path / "digits-1500-1000-seed3-lt100-"
                                                                             "ambiguous")
    assert default_data_dir("digits") == str(tmp_path / "digits")


def test_long_tail_flag_reaches_the_dataset_through_data_source(monkeypatch, tmp_path):
    monkeypatch.setenv("UDTIMM_CACHE", str(tmp_path))
    args = train.parse_args(["--digits-long-tail", "100", "--digits-trainval", "8", "--digits-test", "4",
                             "--digits-seed", "2", "--digits-ambiguous"])
    source = data_flags.data_source(args)
    assert source.options == {"num_trainval": 8, "num_test": 4, "seed": 2, "ambiguous": True, "long_tail": 100.0}
    assert "long_tail" not in data_flags.data_source(train.parse_args([])).options  # older provenance stays equal
    assert len(source.load("train")) == 8
    with open(tmp_path / "digits-8-4-seed2-lt100-ambiguous" / ".complete") as f:
        assert json.load(f) == {"format": 1, "num_trainval": 8, "num_test": 4, "min_size": 64, "max_size": 96,
                                "seed": 2, "ambiguous": True, "long_tail": 100.0}
