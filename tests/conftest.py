"""Shared fixtures: no network, few threads, one tiny digits dataset per test session."""

import csv
import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY_DIGITS = {"num_trainval": 96, "num_test": 40}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small digits dataset in the VOC layout (generated once per session)."""
    from udtimm.data.digits import ensure_digits

    root = str(tmp_path_factory.mktemp("data") / "digits")
    ensure_digits(root, **TINY_DIGITS)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """best.safetensors of a train.py run of a few seconds on the tiny digits set, shared by the test files that
    only read it (copy it first to write beside it, e.g. a thresholds file)."""
    import train

    output = str(tmp_path_factory.mktemp("runs"))
    train.main(tiny_train_args(tiny_digits, output, "--experiment", "tiny"))
    return os.path.join(output, "tiny", "best.safetensors")


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


def run_two_cpu_processes(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` (train.py, validate.py, ...) in 2 CPU processes under torchrun, as a user launches it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               script, *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
