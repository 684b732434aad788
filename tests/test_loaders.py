"""loaders.py: a run's datasets and loaders, their batches finished on the device."""

import pytest
import torch
from conftest import tiny_train_args
from torchvision.transforms.v2.functional import resize

import train
from udtimm import config, devices, loaders
from udtimm.config import ConfigError
from udtimm.data.base import read_image
from udtimm.model import create_model
from udtimm.settings import ModelSettings


def tiny_settings(data_dir: str, *extra: str) -> config.DataSettings:
    return config.training_settings(train.parse_args(tiny_train_args(data_dir, "unused", *extra))).data


def test_eval_batches_are_the_resized_images_normalised_with_the_backbones_statistics(tiny_digits: str) -> None:
    data = tiny_settings(tiny_digits)
    train_set, eval_set, _ = loaders.load_datasets(data, devices.make_accelerator())
    backbone = create_model(ModelSettings("test_resnet"), 3).backbone
    mean, std = loaders.normalisation(backbone)
    assert (mean, std) == (list(backbone.pretrained_cfg["mean"]), list(backbone.pretrained_cfg["std"]))
    train_loader, eval_loader, train_transform, eval_transform = loaders.build_loaders(
        data, train_set, eval_set, mean, std, torch.device("cpu"))
    images, target, _, indices = next(iter(eval_loader))
    assert images.dtype == torch.uint8 and images.shape == (data.batch_size, 3, data.img_size, data.img_size)
    sample = eval_set.samples[int(indices[0])]
    first = resize(read_image(sample.path), [data.img_size] * 2, antialias=True)
    expected_target = torch.from_numpy(sample.dense(len(eval_set.classes))[0])
    assert torch.equal(images[0], first) and torch.equal(target[0], expected_target)
    expected = (first.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(eval_transform(images)[0], expected)  # float32 arithmetic: its default tolerance
    train_images = next(iter(train_loader))[0]
    assert train_transform(train_images).dtype == torch.float32 and len(train_loader) == len(train_set) // 16


def test_gpu_decode_is_refused_off_cuda(tiny_digits: str) -> None:
    data = tiny_settings(tiny_digits, "--gpu-decode")
    train_set, eval_set, _ = loaders.load_datasets(data, devices.make_accelerator())
    with pytest.raises(ConfigError, match="--gpu-decode decodes on a CUDA GPU .* on cpu"):
        loaders.build_loaders(data, train_set, eval_set, [0.5] * 3, [0.5] * 3, torch.device("cpu"))


def image_paths(dataset) -> set[str]:
    return {sample.path for sample in dataset.samples}


def test_the_selection_split_shares_no_image_with_training_or_the_test_split(tiny_digits: str) -> None:
    accelerator = devices.make_accelerator()
    train_set, eval_set, test_set = loaders.load_datasets(tiny_settings(tiny_digits), accelerator)
    assert (eval_set.name, test_set.name) == ("digits:val", "digits:test") and len(eval_set) > 0
    assert not image_paths(eval_set) & (image_paths(train_set) | image_paths(test_set))
    paper = loaders.load_datasets(tiny_settings(tiny_digits, "--select-on-test"), accelerator)
    assert paper[1] is paper[2] and paper[1].name == "digits:test"
    trainval = image_paths(paper[0])
    kept, held, test = loaders.load_datasets(tiny_settings(tiny_digits, "--val-split", "holdout",
                                                           "--holdout-fraction", "0.25"), accelerator)
    assert len(held) == len(trainval) // 4 and image_paths(kept) | image_paths(held) == trainval
    assert not image_paths(kept) & image_paths(held) and test.name == "digits:test"
    with pytest.raises(ConfigError, match="--val-split trainval and --train-split train share 96 image"):
        loaders.load_datasets(tiny_settings(tiny_digits, "--val-split", "trainval"), accelerator)


def test_drop_labels_hides_training_labels_only(tiny_digits: str, capsys) -> None:
    accelerator = devices.make_accelerator()
    for selection in ((), ("--val-split", "holdout")):
        train_set, eval_set, test_set = loaders.load_datasets(
            tiny_settings(tiny_digits, "--drop-labels", "0.5", "--drop-labels-seed", "2", *selection), accelerator)
        hidden = (train_set.dense_labels()[0] == -1).sum(0)
        assert hidden.tolist() == [round(0.5 * len(train_set))] * len(train_set.classes)
        for dataset in (eval_set, test_set):  # the splits that choose and report keep every label
            assert (dataset.dense_labels()[0] >= 0).all()
    assert "warning" not in capsys.readouterr().out
