"""benchmarks/attention_gradients.py runs on the tiny digits set and prints one row per attention variant."""

import os
import sys

import pytest
from conftest import ROOT, tiny_train_args

import train
from udtimm.attention import ATTENTION_VARIANTS

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import attention_gradients  # noqa: E402


@pytest.mark.slow
def test_prints_the_gradient_norm_of_each_term_per_variant(tiny_digits, tmp_path, capsys) -> None:
    train.main(tiny_train_args(tiny_digits, str(tmp_path), "--cal", "--experiment", "teacher", "--epochs", "1"))
    teacher = str(tmp_path / "teacher" / "best.safetensors")
    capsys.readouterr()
    attention_gradients.main(["--batches", "2", *tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt",
                                                                 teacher, "--initial-checkpoint", teacher)])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: [float(cell) for cell in line.split()[1:]] for line in lines[3:]}
    assert set(rows) == set(ATTENTION_VARIANTS)
    for values in rows.values():
        assert len(values) == 6 and all(value >= 0 for value in values) and values[0] > 0
