"""udtimm.errors: every user-facing error in one module that imports nothing heavy."""

import subprocess
import sys

import pytest

from udtimm import checkpoint, cli, config, errors, model, weights
from udtimm.data import base


def test_each_module_raises_the_one_class_that_the_scripts_print_as_a_line() -> None:
    assert cli.USER_ERRORS is errors.USER_ERRORS
    assert (config.ConfigError, checkpoint.CheckpointError, base.DatasetError, model.ModelConfigError,
            weights.WeightsError) == (errors.ConfigError, errors.CheckpointError, errors.DatasetError,
                                      errors.ModelConfigError, errors.WeightsError)
    assert issubclass(errors.CorruptImageError, errors.DatasetError)
    assert all(issubclass(error, errors.USER_ERRORS) for error in (errors.HeadConfigError, errors.NonFiniteLossError))


@pytest.mark.slow
def test_importing_the_errors_loads_no_torch() -> None:
    code = "import sys, udtimm.errors; print('torch' in sys.modules, 'udtimm.config' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_long_lists_are_shortened_to_their_first_items_and_a_count() -> None:
    assert errors.shortened(["a", "b"]) == "['a', 'b']" and errors.shortened(None) == "None"
    assert errors.shortened(list(range(errors.QUOTED_ITEMS))) == repr(list(range(errors.QUOTED_ITEMS)))
    assert errors.shortened(tuple(range(10_003)), limit=3) == "[0, 1, 2, ... 10,000 more]"
