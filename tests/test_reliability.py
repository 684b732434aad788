"""Issue 7: resume after a kill (bit-identical runs), atomic outputs, the best checkpoint, non-finite losses.
Bad input and refused files: tests/test_bad_input.py."""

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from conftest import read_rows, tiny_train_args
from safetensors.torch import load_file

import train
from udtimm import checkpoint, losses, trainer
from udtimm.data.loader import make_loader
from udtimm.errors import NonFiniteLossError
from udtimm.metrics import METRIC_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 6  # 96 tiny digits in batches of 16
TIMING_COLUMNS = ("epoch_time", "images_per_s")  # the only cells of summary.csv a resumed run may change


@pytest.fixture(scope="module")
def reference(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An uninterrupted two-epoch run: what every interrupted one must end up identical to."""
    output = str(tmp_path_factory.mktemp("reference"))
    train.main(tiny_train_args(tiny_digits, output, "--experiment", "ref"))
    return os.path.join(output, "ref")


def assert_same_run(run_dir: str, reference: str) -> None:
    """Same weights bit for bit, the same summary rows (each epoch once) and the same final metrics."""
    for name in ("best.safetensors", "last.safetensors"):
        got, want = load_file(os.path.join(run_dir, name)), load_file(os.path.join(reference, name))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), name
    with open(os.path.join(run_dir, "summary.csv")) as handle:
        assert handle.read().count("epoch,") == 1  # one header
    got_rows, want_rows = (read_rows(os.path.join(d, "summary.csv")) for d in (run_dir, reference))
    assert [row["epoch"] for row in got_rows] == ["0", "1"]
    for got, want in zip(got_rows, want_rows, strict=True):
        assert {k: v for k, v in got.items() if k not in TIMING_COLUMNS} == \
            {k: v for k, v in want.items() if k not in TIMING_COLUMNS}
    (got,) = read_rows(os.path.join(run_dir, "results.csv"))
    (want,) = read_rows(os.path.join(reference, "results.csv"))
    assert {k: got[k] for k in (*METRIC_NAMES, "best_epoch")} == {k: want[k] for k in (*METRIC_NAMES, "best_epoch")}


def assert_no_leftovers(run_dir: str) -> None:
    names = os.listdir(run_dir)
    assert "state" in names and not {"state.tmp", "state.old"} & set(names)
    assert not [name for name in names if name.endswith(".tmp")]


# ---------------------------------------------------------------- 1. kill and resume


@pytest.mark.slow
def test_a_run_killed_with_sigkill_mid_epoch_resumes_to_the_same_weights_and_metrics(
        tiny_digits: str, reference: str, tmp_path) -> None:
    run_dir = tmp_path / "killed"
    # With the progress bar on, stderr says when epoch 1 has started; the same thread count as this process
    # keeps the CPU arithmetic identical.
    args = [a for a in tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "killed") if a != "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "stderr.txt"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=log)
        deadline = time.monotonic() + 240
        while "train 1:" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "epoch 1 never started"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    assert not (run_dir / "results.csv").exists()
    train.main(["--resume", str(run_dir), "--no-progress"])
    assert_same_run(str(run_dir), reference)


@pytest.mark.slow
def test_repeated_kills_inside_checkpoint_writes_resume_to_the_same_run(
        tiny_digits: str, reference: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three kills (SystemExit stands in for SIGKILL, the files are left as a kill leaves them), then a clean resume."""
    run_dir = str(tmp_path / "k")
    resume = ["--resume", run_dir, "--no-progress"]

    # 1. After epoch 0's summary row, before its first state: epoch 0 is redone and listed once.
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_training_state", lambda *args, **kwargs: sys.exit("killed"))
        with pytest.raises(SystemExit):
            train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "k"))
    assert [row["epoch"] for row in read_rows(os.path.join(run_dir, "summary.csv"))] == ["0"]

    # 2. Inside epoch 1's state swap, state/ moved aside and state.tmp/ not yet in its place; best.safetensors
    # half-written to its temporary name.
    rename = os.rename

    def kill_before_the_swap(src: str, dst: str) -> None:
        if src.endswith("state.tmp") and os.path.isdir(os.path.join(run_dir, "state.old")):
            open(os.path.join(run_dir, ".best.safetensors.x1y2.tmp"), "wb").write(b"partial")
            sys.exit("killed")
        rename(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.os, "rename", kill_before_the_swap)
        with pytest.raises(SystemExit):
            train.main(resume)
    assert {"state.old", "state.tmp"} <= set(os.listdir(run_dir)) and "state" not in os.listdir(run_dir)

    # 3. All epochs done, killed while drawing reliability.png: no results row yet.
    with monkeypatch.context() as patch:
        patch.setattr("udtimm.trainer.reliability_diagram", lambda *args, **kwargs: sys.exit("killed"))
        with pytest.raises(SystemExit):
            train.main(resume)
    assert not os.path.exists(os.path.join(run_dir, "results.csv"))

    train.main(resume)
    assert_same_run(run_dir, reference)
    assert_no_leftovers(run_dir)


@pytest.mark.slow
def test_the_number_of_workers_does_not_change_a_run(tiny_digits: str, reference: str, tmp_path) -> None:
    """The reference ran with --workers 0; two persistent workers draw the same augmentations in both epochs."""
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "w2", "--workers", "2"))
    assert_same_run(str(tmp_path / "w2"), reference)


def test_train_order_depends_on_seed_and_epoch_alone_with_several_processes() -> None:
    """accelerate shuffles a multi-process loader with a generator it keeps across epochs: reseeded per epoch,
    a resumed run's first epoch is shuffled like that epoch of an uninterrupted run, not like epoch 0."""

    def sharded_loader():  # what rank 0 of 2 iterates, as accelerator.prepare builds it
        return prepare_data_loader(make_loader(list(range(32)), 4, True, 0), num_processes=2, process_index=0,
                                   put_on_device=False, rng_types=None)

    def order(loader, seed: int) -> list[int]:
        trainer.seed_epoch(seed, loader)
        return torch.cat(list(loader)).tolist()

    uninterrupted = sharded_loader()
    first, second = order(uninterrupted, 0), order(uninterrupted, 1)
    assert first != second
    assert order(sharded_loader(), 1) == second


def test_a_summary_row_cut_short_is_dropped_on_resume(tmp_path) -> None:
    path = str(tmp_path / "summary.csv")
    with open(path, "w") as handle:
        handle.write("epoch,map\n9,50.0\n10,51.0\n1")  # epoch 11's row, cut after one character by a full disk
    trainer.truncate_summary(path, 10)
    assert [row["epoch"] for row in read_rows(path)] == ["9", "10"]


# ---------------------------------------------------------------- 2-3. best checkpoint, non-finite loss


@pytest.fixture(scope="module")
def nan_run(tiny_digits: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A run whose bce is NaN at epoch 1, step 2: it stops there, then resumes with --skip-nonfinite.

    Its mAP is scripted to fall after epoch 0 (50 then 40), so best.safetensors must stay at epoch 0.
    """
    output = str(tmp_path_factory.mktemp("nan"))
    run_dir = os.path.join(output, "nan")
    result: dict = {"run_dir": run_dir}
    real_bce, real_metrics = losses.bce_loss, trainer.evaluate_metrics
    calls = {"bce": 0}
    scripted_map = [50.0, 40.0]

    def bce_nan_at(step: int):
        calls["bce"] = 0

        def bce(*args, **kwargs):
            calls["bce"] += 1
            value = real_bce(*args, **kwargs)
            return value * math.nan if calls["bce"] == step + 1 else value

        return bce

    def metrics(*args, **kwargs) -> dict[str, float]:
        scores = real_metrics(*args, **kwargs)
        return {**scores, "map": scripted_map.pop(0)} if scripted_map else scores

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "evaluate_metrics", metrics)
        patch.setattr(losses, "bce_loss", bce_nan_at(STEPS_PER_EPOCH + 2))
        with pytest.raises(NonFiniteLossError) as stopped:
            train.main(tiny_train_args(tiny_digits, output, "--experiment", "nan"))
        result["error"] = str(stopped.value)
        result["last_after_stop"] = checkpoint.read_metadata(os.path.join(run_dir, "last.safetensors"))
        result["state_after_stop"] = checkpoint.load_training_state(os.path.join(run_dir, "state"))
        result["summary_after_stop"] = read_rows(os.path.join(run_dir, "summary.csv"))
        patch.setattr(losses, "bce_loss", bce_nan_at(2))  # the resumed run starts at epoch 1, step 0
        train.main(["--resume", run_dir, "--skip-nonfinite", "--no-progress"])
    yield result


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_epoch_step_and_term(nan_run: dict) -> None:
    assert "epoch 1, step 2" in nan_run["error"] and "'bce'" in nan_run["error"]
    assert "--skip-nonfinite" in nan_run["error"]


def test_a_nan_loss_keeps_the_last_good_checkpoint(nan_run: dict) -> None:
    assert nan_run["last_after_stop"]["epoch"] == "0"
    tensors, _, progress = nan_run["state_after_stop"]
    assert progress["epoch"] == 0 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert [row["epoch"] for row in nan_run["summary_after_stop"]] == ["0"]


def test_skip_nonfinite_skips_the_step_and_counts_it(nan_run: dict) -> None:
    rows = read_rows(os.path.join(nan_run["run_dir"], "summary.csv"))
    assert [(row["epoch"], row["skipped_steps"]) for row in rows] == [("0", "0"), ("1", "1")]
    assert all(math.isfinite(float(row["train_loss"])) for row in rows)


def test_best_checkpoint_is_replaced_only_by_a_better_epoch(nan_run: dict) -> None:
    run_dir = nan_run["run_dir"]
    assert [row["map"] for row in read_rows(os.path.join(run_dir, "summary.csv"))] == ["50.0", "40.0"]
    assert checkpoint.read_metadata(os.path.join(run_dir, "best.safetensors"))["epoch"] == "0"
    assert checkpoint.read_metadata(os.path.join(run_dir, "last.safetensors"))["epoch"] == "1"
    (row,) = read_rows(os.path.join(run_dir, "results.csv"))
    assert row["best_epoch"] == "0"


def stopped_and_resumed(args: list[str], run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.main(args) stopped as epoch 1 begins (SystemExit stands in for a kill), then resumed to its end."""
    real = trainer.train_one_epoch

    def stop_at_epoch_1(*args, **kwargs):
        if args[6] == 1:  # the epoch
            sys.exit("killed")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "train_one_epoch", stop_at_epoch_1)
        with pytest.raises(SystemExit):
            train.main(args)
    train.main(["--resume", run_dir, "--no-progress"])


@pytest.mark.slow
def test_an_interrupted_ema_run_resumes_to_the_same_raw_and_ema_weights(tiny_digits: str, tmp_path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--model-ema: the EMA weights come back from state/, so a run stopped after epoch 0 ends as an uninterrupted one
    (both weights bit for bit, the *_ema columns, the choice of best.safetensors)."""
    flags = ("--model-ema", "--loss", "asl")
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "whole", *flags))
    stopped_and_resumed(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "stopped", *flags),
                        str(tmp_path / "stopped"), monkeypatch)
    assert_same_run(str(tmp_path / "stopped"), str(tmp_path / "whole"))
    got, want = (load_file(str(tmp_path / name / "state" / "ema.safetensors")) for name in ("stopped", "whole"))
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
    assert "map_ema" in read_rows(str(tmp_path / "whole" / "summary.csv"))[0]


@pytest.mark.slow
@pytest.mark.parametrize(("head", "options"), [("ml-decoder", ("embed_dim=16", "num_heads=2", "ff_dim=32")),
                                               ("csra", ("num_heads=2", "lam=0.5"))])
def test_an_interrupted_run_with_a_spatial_head_resumes_bit_identically(tiny_digits: str, tmp_path, head: str,
                                                                        options: tuple[str, ...],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--head with its --head-kwargs (ML-Decoder's dropout and fixed queries included), --cal, --model-ema and
    --channels-last at 64 px (a 2 x 2 map): stopped after epoch 0 and resumed, the run ends as an uninterrupted one."""
    flags = ("--head", head, "--head-kwargs", *options, "--cal", "--model-ema", "--channels-last", "--img-size", "64")
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "whole", *flags))
    stopped_and_resumed(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "stopped", *flags),
                        str(tmp_path / "stopped"), monkeypatch)
    assert_same_run(str(tmp_path / "stopped"), str(tmp_path / "whole"))
    metadata = checkpoint.read_metadata(str(tmp_path / "stopped" / "best.safetensors"))
    assert metadata["head"] == head and metadata["method"] == f"cal+{head}+ema"
