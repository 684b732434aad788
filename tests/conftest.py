"""Shared fixtures: no network, few threads, one tiny digits dataset per test session."""

import csv
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY_DIGITS = {"num_trainval": 96, "num_test": 40}


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small digits dataset in the VOC layout (generated once per session)."""
    from udtimm.data.digits import ensure_digits

    root = str(tmp_path_factory.mktemp("data") / "digits")
    ensure_digits(root, **TINY_DIGITS)
    return root


def tiny_train_args(data_dir: str, output: str, *extra: str) -> list[str]:
    """train.py/distill.py flags for a run of a few seconds on the tiny digits set."""
    return [
        "--dataset", "digits", "--data-dir", data_dir,
        "--digits-trainval", str(TINY_DIGITS["num_trainval"]), "--digits-test", str(TINY_DIGITS["num_test"]),
        "--model", "test_resnet", "--img-size", "32", "-b", "16", "--epochs", "2", "--workers", "0",
        "--warmup-epochs", "0", "--output", output, "--no-progress", *extra,
    ]


def read_rows(path: str) -> list[dict[str, str]]:
    """The rows of a CSV written by udtimm (summary.csv, results.csv, ...)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
