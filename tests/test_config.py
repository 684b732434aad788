import argparse
import re

import pytest

import distill
import predict
import train
import validate
from udtimm.config import ConfigError, fill_dataset_defaults


def test_digits_gets_mild_augmentation_and_other_datasets_the_papers() -> None:
    digits = train.parse_args([])
    assert (digits.img_size, digits.reprob, digits.hflip, digits.crop_scales) == (48, 0.0, 0.0, [1.0, 0.875])
    voc = train.parse_args(["--dataset", "voc2007"])
    assert (voc.img_size, voc.reprob, voc.hflip) == (448, 0.5, 0.5)
    assert voc.crop_scales == [1.0, 0.875, 0.75, 0.66, 0.5]


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


def script_parser(script, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser a script's parse_args builds (caught as it parses a minimal command line)."""
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        return real(parser, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    argv = {distill: ["--teacher-ckpt", "t.safetensors"], validate: ["--checkpoint", "c"],
            predict: ["--checkpoint", "c", "image.jpg"]}.get(script, [])
    script.parse_args(argv)
    return parsers[-1]


@pytest.mark.parametrize("script", [train, distill, validate], ids=lambda script: script.__name__)
def test_help_shows_the_default_of_every_option_that_has_one(script, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = script_parser(script, monkeypatch)
    blocks = help_blocks(parser)
    options = [action for action in parser._actions if action.option_strings and action.default != argparse.SUPPRESS]
    assert len(options) > 15
    for action in options:
        block = blocks[max(action.option_strings, key=len)]
        if action.default is None:
            assert "(default: None)" not in block
        else:
            assert f"(default: {action.default})" in block, block


@pytest.mark.parametrize("script", [train, distill, validate, predict], ids=lambda script: script.__name__)
def test_help_says_each_default_once(script, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = script_parser(script, monkeypatch)
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
