"""--log-with: every summary.csv row also goes to TensorBoard, Weights & Biases or MLflow (accelerate's trackers).

summary.csv stays the record of a run; a tracker gets the same numbers, epoch by epoch, for its dashboards.
TensorBoard writes into <run dir>/udtimm/; W&B names the run after the run directory (project "udtimm");
MLflow logs to its tracking URI (MLFLOW_TRACKING_URI, default ./mlruns), experiment "udtimm", run named after
the run directory, artifacts in the run directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from accelerate import Accelerator
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from udtimm.errors import ConfigError

PROJECT = "udtimm"
# --log-with name -> the package to install, and accelerate's check that it is there.
TRACKERS = {
    "tensorboard": ("tensorboard", is_tensorboard_available),
    "wandb": ("wandb", is_wandb_available),
    "mlflow": ("mlflow", is_mlflow_available),
}


def tracker_names(log_with: str | None) -> list[str]:
    """The trackers of a --log-with value ("all": every one), each checked installed.

    accelerate leaves out a tracker whose package is missing with a log message only; here it stops the run before
    any work, naming the package.
    """
    if log_with is None:
        return []
    names = list(TRACKERS) if log_with == "all" else [log_with]
    for name in names:
        package, _ = TRACKERS[name]
        if not is_installed(name):
            raise ConfigError(f"--log-with {log_with} needs the {package} package: pip install {package}")
    return names


def is_installed(name: str) -> bool:
    return bool(TRACKERS[name][1]())


def start_trackers(accelerator: Accelerator, flags: Mapping[str, object], run_dir: str) -> None:
    """Open the run in every tracker of the accelerator (none without --log-with), with the flags as its config."""
    name = os.path.basename(os.path.normpath(run_dir))
    config = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
              for key, value in sorted(flags.items())}
    accelerator.init_trackers(PROJECT, config=config, init_kwargs={
        "wandb": {"name": name, "dir": run_dir},
        "mlflow": {"run_name": name, "logging_dir": run_dir},
    })


def log_epoch(accelerator: Accelerator, row: Mapping[str, object]) -> None:
    """The numeric cells of a summary.csv row, at step = epoch (NaN cells, such as metrics of an epoch without
    evaluation, are left out)."""
    values = {key: value for key, value in row.items()
              if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value)}
    accelerator.log(values, step=int(row["epoch"]))
