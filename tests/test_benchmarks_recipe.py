"""Smoke test of benchmarks/recipe_digits.py: one seed of its four runs, tiny, then its report and claims."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_arm_ignores_moved_defaults, read_rows

from benchmarks import recipe_digits

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_digits.py"


@pytest.mark.slow
def test_recipe_benchmark_runs_each_method_and_writes_its_tables(tiny_digits: str, tmp_path) -> None:
    out = tmp_path / "bench"
    tiny = ["--data-dir", tiny_digits, "--digits-trainval", "96", "--digits-test", "40", "--model", "test_resnet",
            "--img-size", "32", "-b", "32", "--epochs", "1", "--warmup-epochs", "0"]
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--seeds", "0", "--results", str(tmp_path / "long.csv"),
               "--extra", *tiny]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    methods = {read_rows(str(out / name / "results.csv"))[0]["method"]
               for name in ("baseline-seed0", "baseline+ema-seed0", "asl-seed0", "asl+cal-seed0")}
    assert methods == {"baseline", "baseline+ema", "asl", "asl+cal"}
    report, claims = (out / "report.md").read_text(), (out / "claims.md").read_text()
    assert all(f"| {method} |" in report for method in methods)
    assert "ASL beats BCE" in claims and "ema weights, last epoch" in claims
    long = read_rows(str(tmp_path / "long.csv"))  # one row per run, named by its arm
    assert [row["arm"] for row in long] == ["baseline", "baseline+ema", "asl", "asl+cal"]
    assert {row["method"] for row in long} == methods and all(len(row["commit"]) in (7, 40) or row["commit"] ==
                                                               "unknown" for row in long)


def test_every_run_names_the_setting_of_its_design_and_prints_without_running(tmp_path, capsys) -> None:
    moved = {"model": "resnet18", "img_size": 64, "epochs": 3, "loss": "temperature", "seed": 9}
    for job in recipe_digits.plan(recipe_digits.parse_args(["--out", str(tmp_path / "out"), "--seeds", "0"])):
        assert_arm_ignores_moved_defaults(job, moved, tmp_path)
    with pytest.raises(SystemExit):
        recipe_digits.main(["--print-commands", "--seeds", "0", "--out", str(tmp_path / "out")])
    assert len(capsys.readouterr().out.splitlines()) == 2 * len(recipe_digits.METHODS)
    assert not (tmp_path / "out").exists()
