"""hparams/*.yaml: every experiment config parses as written and trains one tiny step on digits.

The real settings (ImageNet weights, 448 px, VOC/COCO, bf16) are overridden from the command line so that the
smoke run is offline and takes seconds; what is left of each file (losses, pooling, optimizer, schedule,
distillation weights) is exercised as written.
"""

import glob
import os

import pytest
import timm
import torch
import yaml
from conftest import tiny_train_args

import distill
import train
from udtimm import report
from udtimm.data.digits import ensure_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "hparams", "*.yaml")))
EPOCHS = {"voc2007": 20, "coco2014": 40}
# Smaller than conftest's tiny set: two training steps of 16 per epoch keep ~35 runs within seconds each.
SMOKE_DIGITS = {"num_trainval": 32, "num_test": 16}
# File name suffix -> the method column results.csv gets (and report.PAPER_MAP is keyed by).
METHODS = {"baseline": "baseline", "cal": "cal", "kd": "kd", "ud": "ud", "ud_noatt": "ud-noatt",
           "self_ud": "self-ud",
           "temperature": "temperature", "label_smoothing": "label-smoothing", "one_over_k": "one-over-k",
           "tricks_none": "baseline", "tricks_erasing": "baseline", "tricks_cosine": "baseline",
           "asl_recipe": "asl+ema", "asl_recipe_cal": "asl+cal+ema", "ml_decoder_asl_recipe": "asl+ml-decoder+ema"}
# ASL's recipe (not a row of the paper): 40 epochs on either dataset, as ASL's train.py.
RECIPE_EPOCHS = 40


def load(path: str) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def is_distill(config: dict) -> bool:
    return any(key in config for key in ("teacher_ckpt", "self_distill", "method"))


def expected_method(path: str, config: dict) -> str:
    stem = os.path.basename(path)[: -len(".yaml")]
    prefix = f"{config['dataset']}_{config['model'].split('.')[0]}_"
    assert stem.startswith(prefix), f"{stem}: name it <dataset>_<backbone>_<method>.yaml"
    return METHODS[stem[len(prefix) :]]


def test_there_is_a_config_for_every_table() -> None:
    names = {os.path.basename(path) for path in CONFIGS}
    for name in ("voc2007_resnet101_cal.yaml", "coco2014_resnet18_baseline.yaml", "voc2007_resnet18_ud.yaml",
                 "voc2007_resnet101_self_ud.yaml", "voc2007_resnet101_tricks_none.yaml",
                 "voc2007_resnet18_one_over_k.yaml", "voc2007_resnet18_ud_noatt.yaml"):
        assert name in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_as_written_and_documents_its_row(path: str) -> None:
    config = load(path)
    script = distill if is_distill(config) else train
    args = script.parse_args(["-c", path])  # every key is a flag of the script that runs it
    assert timm.is_model(config["model"]), config["model"]
    # OpenImages' published models are at 224 px; the paper's tables and the COCO/VOC recipes at 448.
    assert args.pretrained and args.img_size == (224 if config["dataset"] == "openimages" else 448)
    method = expected_method(path, config)
    assert (script.method_name(args.loss, args.cal, args.model_ema, args.head) if script is train
            else script.method_name(args)) == method
    with open(path) as handle:
        header = handle.read().split("\n\n", 1)[0]
    assert f"-c hparams/{os.path.basename(path)}" in header
    if "asl_recipe" in path:  # a recipe from another paper: its source is cited instead of a row of this one
        assert header.startswith("# ASL recipe") and "Alibaba-MIIL/ASL" in header and args.epochs == RECIPE_EPOCHS
        assert not args.select_on_test and args.val_split == ("val" if config["dataset"] == "openimages" else "holdout")
        return
    # The paper reports its best test epoch: its rows choose on the test split, and their header says why.
    assert args.select_on_test and args.val_split == args.test_split and "select_on_test" in header
    assert args.epochs == (80 if config.get("self_distill") else EPOCHS[config["dataset"]])
    assert header.startswith("# Table") and "Paper: mAP" in header
    if script is distill and args.method == "ud":  # the distance and form of Eq. 17, never left to a default
        assert {"att_weight", "att_variant", "att_distance", "distill_warmup_epochs"} <= set(config), path
        assert config["att_distance"] == "norm" and "att_distance norm" in header
    if "tricks" not in path:  # Table 1 rows share the method "baseline" with Table 2: no entry of their own
        teacher = "resnet101.tv_in1k" if method in report.TEACHER_KEYED_METHODS else ""
        assert report.paper_number(config["dataset"], config["model"], method, teacher) is not None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model gains nothing from a second intra-op thread; on shared, busy cores its spin-waiting made each
    # smoke run 10-30x slower (measured: 0.3 s with one thread, 10 s with two).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smoke_args(data_dir: str, output: str, *extra: str) -> list[str]:
    sizes = ["--digits-trainval", str(SMOKE_DIGITS["num_trainval"]), "--digits-test", str(SMOKE_DIGITS["num_test"])]
    return [*tiny_train_args(data_dir, output, "--epochs", "1", *extra), *sizes]


@pytest.fixture(scope="module")
def smoke_digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_digits(str(tmp_path_factory.mktemp("data") / "digits"), **SMOKE_DIGITS)


@pytest.fixture(scope="module")
def tiny_teacher(smoke_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    output = str(tmp_path_factory.mktemp("teacher"))
    train.main(smoke_args(smoke_digits, output, "--cal", "--experiment", "teacher"))
    return os.path.join(output, "teacher", "best.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_trains_one_tiny_epoch(path: str, smoke_digits: str, tiny_teacher: str, tmp_path) -> None:
    config = load(path)
    # Offline and small: tiny_train_args (digits at 32 px, test_resnet, batch 16) on the smoke set, no pretrained
    # download. Mixed precision stays "no": accelerate keeps one precision per process and the other tests of this
    # session run without autocast.
    argv = ["-c", path, *smoke_args(smoke_digits, str(tmp_path), "--experiment", "smoke", "--no-pretrained",
                                    "--mixed-precision", "no")]
    if config.get("self_distill"):
        argv += ["--epochs", "2"]  # one epoch on labels, one distilled
    if is_distill(config) and not config.get("self_distill"):
        argv += ["--teacher-ckpt", tiny_teacher]
    row = (distill if is_distill(config) else train).main(argv)
    assert row["method"] == expected_method(path, config)
    assert 0 <= row["map"] <= 100
    assert os.path.isfile(os.path.join(str(tmp_path), "smoke", "results.csv"))
