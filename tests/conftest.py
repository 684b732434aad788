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
OPENIMAGES_CLASSES = 10_000  # OpenImages v6 trains about 9,600
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


@pytest.fixture(scope="session")
def many_classes_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """best.safetensors of a random-init test_resnet (32 px) with OPENIMAGES_CLASSES classes, written without training:
    the output paths at OpenImages' scale (copy it first to write beside it)."""
    from udtimm import checkpoint
    from udtimm.model import create_model
    from udtimm.settings import ModelSettings

    names = [f"class{index:05d}" for index in range(OPENIMAGES_CLASSES)]
    torch.manual_seed(0)
    model = create_model(ModelSettings("test_resnet"), len(names), cal=True).eval()
    path = str(tmp_path_factory.mktemp("many_classes") / "best.safetensors")
    checkpoint.save_checkpoint(path, model, checkpoint.model_metadata("test_resnet", model, names, None, 32,
                                                                      [0.5] * 3, [0.25] * 3))
    return path


def tiny_train_args(data_dir: str, output: str, *extra: str) -> list[str]:
    """train.py/distill.py flags for a run of a few seconds on the tiny digits set."""
    return [
        "--dataset", "digits", "--data-dir", data_dir,
        "--digits-trainval", str(TINY_DIGITS["num_trainval"]), "--digits-test", str(TINY_DIGITS["num_test"]),
        "--model", "test_resnet", "--img-size", "32", "-b", "16", "--epochs", "2", "--workers", "0",
        "--warmup-epochs", "0", "--output", output, "--no-progress", *extra,
    ]


def model_labelled_csv(checkpoint_path: str, data_dir: str, folder: str) -> list[str]:
    """validate.py's data flags for the tiny digits val and test images as a CSV set in `folder` whose labels are
    drawn from sigmoid(2 u), u the checkpoint's logit standardised per class over the split: a set that Platt scaling
    fits whatever the tiny model learnt (with the digits labels it ranks the val images backwards, pooled)."""
    from udtimm import Predictor
    from udtimm.data import build_dataset

    predictor = Predictor.from_checkpoint(checkpoint_path, stored_tuning=False)
    generator = torch.Generator().manual_seed(0)
    for split in ("val", "test"):
        paths = [sample.path for sample in build_dataset("digits", data_dir, split, **TINY_DIGITS).samples]
        probabilities = predictor.predict(paths)[predictor.class_names].to_numpy()
        logits = torch.logit(torch.tensor(probabilities, dtype=torch.float64))
        standardised = (logits - logits.mean(0)) / logits.std(0)
        labels = torch.rand(logits.shape, generator=generator, dtype=torch.float64) < torch.sigmoid(2 * standardised)
        rows = [",".join(["image", *predictor.class_names])]
        rows += [",".join([path, *map(str, row)]) for path, row in zip(paths, labels.int().tolist(), strict=True)]
        with open(os.path.join(folder, f"{split}.csv"), "w") as handle:
            handle.write("\n".join(rows) + "\n")
    with open(os.path.join(folder, "classes.txt"), "w") as handle:
        handle.write("\n".join(predictor.class_names) + "\n")
    return ["--dataset", "csv", "--data-dir", folder, "--workers", "0", "--no-progress"]


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


def assert_arm_ignores_moved_defaults(job, moved: dict, folder) -> None:
    """A benchmark job's command, parsed by its script as it is and with the defaults of `moved` changed (through
    -c, as a changed default in the script would do), gives the same values for those settings: the arm names them."""
    import yaml

    import distill
    import train

    script = {"train.py": train, "distill.py": distill}[os.path.basename(job.command[1])]
    config = os.path.join(str(folder), f"{job.name}.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump(moved, handle)
    as_is, with_moved = (vars(script.parse_args([*before, *job.command[2:]])) for before in ((), ("-c", config)))
    assert {key: with_moved[key] for key in moved} == {key: as_is[key] for key in moved}, job.name


def assert_repeats_the_folder_run(run_dir: str, folder_run: str, dataset: str) -> None:
    """The run in `run_dir`, on another format of the tiny digits images, has the weights (best and last) and the
    test metrics of the run that read the folder (tiny_checkpoint's run, `folder_run`)."""
    from safetensors.torch import load_file

    from udtimm.metrics import METRIC_NAMES

    for name in ("best.safetensors", "last.safetensors"):
        got, want = load_file(os.path.join(run_dir, name)), load_file(os.path.join(folder_run, name))
        assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want), name
    (got,) = read_rows(os.path.join(run_dir, "results.csv"))
    (want,) = read_rows(os.path.join(folder_run, "results.csv"))
    assert got["dataset"] == dataset and got["selection_split"] == want["selection_split"] == "val"
    assert {key: got[key] for key in METRIC_NAMES} == {key: want[key] for key in METRIC_NAMES}


def assert_corrupt_image_is_named_and_skipped(dataset, index: int, name: str) -> None:
    """Image `index` of the tiny digits train split (96 images), in another format, cannot be decoded: reading it
    is an error naming it `name`, and --skip-corrupt's loader leaves it out with that name."""
    import re

    from torchvision.transforms.v2 import functional as F

    from udtimm.data.base import CorruptImageError
    from udtimm.data.loader import make_loader

    with pytest.raises(CorruptImageError, match=f"cannot read image {re.escape(name)}"):
        dataset[index]
    dataset.transform = lambda image: F.resize(image, [32, 32])
    batches = list(make_loader(dataset, 16, False, 0, skip_corrupt=True))
    assert sum(len(batch[3]) for batch in batches) == TINY_DIGITS["num_trainval"] - 1
    (message,) = [message for batch in batches for message in batch[4]]
    assert message.startswith(f"cannot read image {name}: ")


def copy_with_thresholds(checkpoint_path: str, folder, low: float, high: float) -> tuple[str, list[str], object]:
    """A copy of `checkpoint_path` in `folder` (to write its tuning file beside it), its class names, and thresholds
    rising from `low` to `high` over the classes, each marked tuned (thresholds.TunedThresholds)."""
    import shutil

    from udtimm import checkpoint, thresholds

    copy = os.path.join(str(folder), "best.safetensors")
    shutil.copy(checkpoint_path, copy)
    names = checkpoint.class_names(checkpoint.read_metadata(copy))
    tuned = torch.ones(len(names), dtype=torch.bool)
    return copy, names, thresholds.TunedThresholds(torch.linspace(low, high, len(names), dtype=torch.float64),
                                                   tuned, tuned)


# validate.py tests (test_validate*.py): the checkpoint they evaluate and its metrics on the tiny test split.
@pytest.fixture(scope="module")
def best(tiny_checkpoint: str) -> str:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def single_process(best: str, tiny_digits: str) -> dict[str, float]:
    import validate

    return validate.main(["--checkpoint", best, *data_flags(tiny_digits)])


def data_flags(data_dir: str) -> list[str]:
    """Where the tiny set is; everything else comes from the checkpoint."""
    return ["--data-dir", data_dir, "--digits-trainval", str(TINY_DIGITS["num_trainval"]),
            "--digits-test", str(TINY_DIGITS["num_test"]), "--workers", "0", "--no-progress"]


def value_and_grad(fn, z, *args, **kwargs):
    """A loss of `z` and its gradient with respect to `z`."""
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, z)
    return loss, grad


def assert_matches_reference(fn, ref, z, y, m, grad_rtol: float = 1e-4) -> None:
    """`fn` on float32 logits against the float64 reference `ref`: finite, value and gradient within float32's
    tolerance (`m` None: every pair counts)."""
    loss, grad = value_and_grad(fn, z.float(), y.float(), m)
    ref_loss, ref_grad = value_and_grad(ref, z, y, torch.ones_like(y, dtype=torch.bool) if m is None else m)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=1e-6)


def assert_bf16_computed_in_float32(fn, ref, z16, y, m) -> None:
    """`fn` on bf16 logits: a float32 loss equal to the reference's on those very logits, a bf16 gradient."""
    loss, grad = value_and_grad(fn, z16, y.float(), m)
    ref_loss, ref_grad = value_and_grad(ref, z16.double(), y, m)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # The loss from the bf16 logits exactly, not from logits rounded again on the way.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=1e-3)
