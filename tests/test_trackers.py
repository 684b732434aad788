"""--log-with: the trackers get summary.csv's numbers; a tracker that is not installed stops the run before any work."""

import os

import pytest
from conftest import read_rows, tiny_train_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from udtimm import trackers
from udtimm.config import ConfigError


@pytest.mark.slow
def test_tensorboard_gets_every_number_of_summary_csv(tiny_digits: str, tmp_path) -> None:
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "tb", "--epochs", "1", "--model-ema",
                               "--log-with", "tensorboard"))
    (row,) = read_rows(str(tmp_path / "tb" / "summary.csv"))
    events = EventAccumulator(str(tmp_path / "tb" / trackers.PROJECT))
    events.Reload()
    logged = set(events.Tags()["scalars"])
    numeric = {name for name, value in row.items() if name != "epoch" and value != "nan"}
    assert numeric == logged and {"map", "map_ema", "ece", "train_bce", "lr"} <= logged
    for name in numeric:
        (scalar,) = events.Scalars(name)
        assert scalar.step == 0
        assert scalar.value == pytest.approx(float(row[name]), rel=1e-6)  # TensorBoard keeps float32


def test_all_names_every_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trackers.tracker_names(None) == [] and trackers.tracker_names("tensorboard") == ["tensorboard"]
    monkeypatch.setattr(trackers, "is_installed", lambda name: True)
    assert trackers.tracker_names("all") == ["tensorboard", "wandb", "mlflow"]


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_stops_the_run_before_its_directory_exists(tracker: str, tiny_digits: str, tmp_path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trackers, "is_installed", lambda name: name != tracker)
    with pytest.raises(ConfigError, match=f"--log-with {tracker} needs the {tracker} package: pip install {tracker}"):
        train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "x", "--log-with", tracker))
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(ConfigError, match=f"pip install {tracker}"):
        trackers.tracker_names("all")
