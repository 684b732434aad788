import pytest

import train
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
