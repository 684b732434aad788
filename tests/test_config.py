import argparse
import hashlib
import re
from pathlib import Path

import pytest
import yaml

import distill
import predict
import train
import validate
from udtimm import visualize
from udtimm.config import ConfigError
from udtimm.data import default_data_dir
from udtimm.data_flags import data_source, fill_dataset_defaults
from udtimm.flags import resume_fixed

ROOT = Path(__file__).resolve().parent.parent


def test_digits_gets_mild_augmentation_and_other_datasets_the_papers() -> None:
    digits = train.parse_args([])
    assert (digits.img_size, digits.reprob, digits.hflip, digits.crop_scales) == (48, 0.0, 0.0, [1.0, 0.875])
    voc = train.parse_args(["--dataset", "voc2007"])
    assert (voc.img_size, voc.reprob, voc.hflip) == (448, 0.5, 0.5)
    assert voc.crop_scales == [1.0, 0.875, 0.75, 0.66, 0.5]


def test_the_selection_split_is_held_out_and_the_test_split_chooses_only_with_select_on_test(tmp_path) -> None:
    """docs/design.md#selection: digits val, voc2007 and coco2014 a holdout of the train split, csv val.csv only
    beside a test.csv (else val.csv is the test split)."""
    defaults = {name: train.parse_args(["--dataset", name, "--data-dir", str(tmp_path)]).val_split
                for name in ("digits", "voc2007", "coco2014", "csv")}
    assert defaults == {"digits": "val", "voc2007": "holdout", "coco2014": "holdout", "csv": "holdout"}
    (tmp_path / "val.csv").write_text("")
    assert train.parse_args(["--dataset", "csv", "--data-dir", str(tmp_path)]).val_split == "holdout"
    (tmp_path / "test.csv").write_text("")
    assert train.parse_args(["--dataset", "csv", "--data-dir", str(tmp_path)]).val_split == "val"
    paper = distill.parse_args(["--self-distill", "--select-on-test", "--test-split", "val2014"])
    assert (paper.val_split, paper.test_split) == ("val2014", "val2014")
    with pytest.raises(ConfigError, match="--val-split test is the split that reports.*--select-on-test"):
        train.parse_args(["--val-split", "test"])
    with pytest.raises(ConfigError, match="--select-on-test chooses on --test-split test: drop --val-split val"):
        train.parse_args(["--select-on-test", "--val-split", "val"])


def test_explicit_flags_beat_dataset_defaults() -> None:
    args = train.parse_args(["--img-size", "64", "--reprob", "0.25", "--crop-scales", "1", "0.5"])
    assert (args.img_size, args.reprob, args.crop_scales) == (64, 0.25, [1.0, 0.5])
    fill_dataset_defaults(args)
    assert args.img_size == 64


def test_pretrained_path_implies_pretrained_and_no_pretrained_exists(tmp_path) -> None:
    assert train.parse_args(["--pretrained-path", "w.safetensors"]).pretrained
    config = tmp_path / "c.yaml"
    config.write_text("pretrained: true\n")
    assert not train.parse_args(["-c", str(config), "--no-pretrained"]).pretrained


def test_pretrained_sha256_checks_the_file_before_any_work(tmp_path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really weights, but a file with a hash")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    args = train.parse_args(["--pretrained-path", str(weights), "--pretrained-sha256", digest.upper()])
    assert args.pretrained_sha256 == digest.upper() and args.pretrained
    with pytest.raises(ConfigError, match=f"{re.escape(str(weights))} has sha256 {digest}, not the"):
        distill.parse_args(["--teacher-ckpt", "t", "--pretrained-path", str(weights), "--pretrained-sha256", "0" * 64])
    with pytest.raises(ConfigError, match="--pretrained-sha256 checks the --pretrained-path file"):
        train.parse_args(["--pretrained-sha256", digest])
    with pytest.raises(ConfigError, match="does not exist"):
        train.parse_args(["--pretrained-path", str(tmp_path / "gone.pth"), "--pretrained-sha256", digest])


def test_config_and_resume_together_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        train.parse_args(["-c", "a.yaml", "--resume", str(tmp_path)])


def test_missing_config_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        train.parse_args(["-c", str(tmp_path / "nope.yaml")])


def help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's --help entry, whitespace-collapsed, by its longest flag."""
    text = parser.format_help()
    blocks = {}
    for block in re.split(r"\n(?=  -)", text):
        flags = re.findall(r"(?<![\w-])--?[\w-]+", block.split("  ", 2)[1] if block.startswith("  -") else "")
        if flags:
            blocks[max(flags, key=len)] = " ".join(block.split())
    return blocks


ENTRY_POINTS = {train: [], distill: ["--teacher-ckpt", "t.safetensors"], validate: ["--checkpoint", "c"],
                visualize: ["--compare", "a.safetensors", "b.safetensors", "--out", "o.png"],
                predict: ["--checkpoint", "c", "image.jpg"]}


def parse_capturing(script, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser that `script.parse_args` builds, and what it parses from the script's minimal command line."""
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        return real(parser, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    args = script.parse_args(ENTRY_POINTS[script])
    return parsers[-1], args


@pytest.mark.parametrize("script", [train, distill, validate, visualize], ids=lambda script: script.__name__)
def test_help_shows_the_default_of_every_option_that_has_one(script, monkeypatch: pytest.MonkeyPatch) -> None:
    parser, _ = parse_capturing(script, monkeypatch)
    blocks = help_blocks(parser)
    options = [action for action in parser._actions if action.option_strings and action.default != argparse.SUPPRESS]
    assert len(options) >= 15
    for action in options:
        block = blocks[max(action.option_strings, key=len)]
        if action.default is None:
            assert "(default: None)" not in block
        else:
            assert f"(default: {action.default})" in block, block


@pytest.mark.slow
def test_every_entry_point_has_the_same_dataset_flags_and_the_default_digits_set(monkeypatch) -> None:
    flags = ("--data-dir", "--digits-trainval", "--digits-test", "--digits-seed")  # --dataset's help says its default
    helps = []
    for script in (train, validate, visualize):
        parser, args = parse_capturing(script, monkeypatch)
        blocks = help_blocks(parser)
        helps.append({flag: blocks[flag] for flag in flags})
        assert {"--train-split", "--val-split"} <= set(blocks) if script is train else "--split" in blocks
        source = data_source(args, "digits")
        assert source.options == {"num_trainval": 3000, "num_test": 1000, "seed": 0, "ambiguous": False}
        assert default_data_dir("digits", *source.options.values()) == default_data_dir("digits")
    assert helps[0] == helps[1] == helps[2]


@pytest.mark.parametrize("script", [train, distill, validate, predict], ids=lambda script: script.__name__)
def test_help_says_each_default_once(script, monkeypatch: pytest.MonkeyPatch) -> None:
    parser, _ = parse_capturing(script, monkeypatch)
    blocks = help_blocks(parser)
    for action in parser._actions:
        if action.option_strings and action.default not in (None, argparse.SUPPRESS):
            block = blocks[max(action.option_strings, key=len)]
            # "default 0.5", "default: 0.5" or "(default: 0.5)": written in the help, or added by HelpFormatter.
            said = re.findall(rf"\bdefault:? {re.escape(str(action.default))}(?![\w.])", block)
            assert len(said) <= 1, block


def test_aa_and_cutout_are_checked_before_any_work() -> None:
    assert train.parse_args(["--cutout"]).cutout == 0.5  # ASL's box: half the side
    assert train.parse_args(["--aa", "rand-m9-mstd0.5", "--cutout", "0.3"]).aa == "rand-m9-mstd0.5"
    with pytest.raises(ConfigError, match="--aa 'rand-x9'"):
        train.parse_args(["--aa", "rand-x9"])
    with pytest.raises(ConfigError, match="--cutout"):
        train.parse_args(["--cutout", "1.5"])
    with pytest.raises(ConfigError, match="--gpu-decode"):
        train.parse_args(["--aa", "rand-m9", "--gpu-decode"])


def test_resuming_md_lists_exactly_the_settings_a_resume_may_not_change() -> None:
    text = (ROOT / "docs" / "resuming.md").read_text(encoding="utf-8")
    section = text.split("### What may not change", 1)[1].split("\n#", 1)[0]
    listed = {flag[2:].replace("-", "_") for flag in re.findall(r"`(--[a-z][\w-]*)`", section)}
    fixed = {**resume_fixed(train.build_parser()), **resume_fixed(distill.build_parser())}
    assert listed == set(fixed) | {condition for condition in fixed.values() if condition}


# Runs the flags are changed from, and a valid other value for the flags whose type alone does not give one.
RESUMED_RUN = {train: [], distill: ["--teacher-ckpt", "t.safetensors"]}
OTHER_VALUES = {"model": "resnet18", "crop_scales": ["1", "0.5"], "model_kwargs": ["drop_path_rate=0.1"],
                "head_kwargs": ["num_heads=2"], "aa": "rand-m9", "opt": "sgd", "sched": "step", "global_pool": "max",
                "dataset": "csv", "val_split": "other", "test_split": "other", "train_split": "other",
                "class_groups": ["100", "20"]}


def _other_value(action: argparse.Action, tmp_path: Path) -> list[str]:
    """The command-line words that give `action` a valid value other than its default."""
    flag = action.option_strings[-1]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if not action.default else f"--no-{flag[2:]}"]
    if action.dest == "select_on_test":  # the run chose on val: test must become the selection split too
        return [flag, "--val-split", "test"]
    if action.nargs == 0:
        return [flag]
    if action.dest == "pretrained_sha256":
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"weights")
        return ["--pretrained-path", str(weights), flag, hashlib.sha256(b"weights").hexdigest()]
    if action.dest in OTHER_VALUES:
        value = OTHER_VALUES[action.dest]
        return [flag, *(value if isinstance(value, list) else [value])]
    if action.choices:
        return [flag, next(str(choice) for choice in action.choices if choice != action.default)]
    if action.type is int:
        return [flag, str((action.default or 0) + 1)]
    if action.type is float:
        return [flag, "0.25"]
    return [flag, "other"]


@pytest.mark.parametrize("script", [train, distill], ids=["train", "distill"])
def test_every_flag_declared_fixed_is_refused_on_resume_and_every_other_may_change(script, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    saved = {key: value for key, value in vars(script.parse_args(RESUMED_RUN[script])).items()
             if key not in ("config", "resume")}
    (run / "args.yaml").write_text(yaml.safe_dump(saved))
    parser = script.build_parser()
    fixed = resume_fixed(parser)
    assert {"att_weight", "gt_weight", "att_distance", "unknown", "drop_labels", "digits_ambiguous"} & set(saved) \
        <= set(fixed)
    for action in parser._actions:
        if action.dest in ("help", "config", "resume") or not action.option_strings:
            continue
        words = ["--resume", str(run), *_other_value(action, tmp_path)]
        if fixed.get(action.dest) == "":
            with pytest.raises(ConfigError, match=f"cannot --resume .*{action.option_strings[-1]}: the run has"):
                script.parse_args(words)
        else:
            script.parse_args(words)  # goes on (a conditionally fixed flag, its condition off: too)


def test_head_options_parse_as_yaml_and_may_not_change_on_resume(tmp_path) -> None:
    args = train.parse_args(["--head", "csra", "--head-kwargs", "num_heads=2", "temperatures=[1,.inf]"])
    assert (args.head, args.head_kwargs) == ("csra", {"num_heads": 2, "temperatures": [1, float("inf")]})
    assert distill.parse_args(["--teacher-ckpt", "t.safetensors"]).head == "linear"
    (tmp_path / "args.yaml").write_text("head: csra\nhead_kwargs: {num_heads: 2}\n")
    with pytest.raises(ConfigError, match=r"--head-kwargs: the run has \{'num_heads': 2\}, now \{'num_heads': 4\}"):
        train.parse_args(["--resume", str(tmp_path), "--head-kwargs", "num_heads=4"])
    with pytest.raises(ConfigError, match="--head: the run has 'csra', now 'ml-decoder'"):
        train.parse_args(["--resume", str(tmp_path), "--head", "ml-decoder"])


def test_epochs_may_change_on_resume_except_with_self_distillation(tmp_path) -> None:
    (tmp_path / "args.yaml").write_text("teacher_ckpt: t.safetensors\nepochs: 4\nlr: 0.002\n")
    args = distill.parse_args(["--resume", str(tmp_path), "--epochs", "6", "--lr", "0.001"])
    assert (args.epochs, args.lr, args.teacher_ckpt) == (6, 0.001, "t.safetensors")
    (tmp_path / "args.yaml").write_text("self_distill: true\nepochs: 4\n")
    with pytest.raises(ConfigError, match=r"--epochs: the run has 4, now 6 \(fixed with --self-distill\)"):
        distill.parse_args(["--resume", str(tmp_path), "--epochs", "6"])
