"""udtimm.report: statistics over seeds against numpy, Markdown/CSV output, paper numbers, curves, bad input."""

import io
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_train_args
from PIL import Image
from safetensors.torch import save_file

import train
from udtimm import config, report, runs
from udtimm.io import append_csv_row
from udtimm.metrics import METRIC_NAMES, metric_names

PAPER_HEADINGS = [heading for _, heading in report.PAPER_COLUMNS]
# The columns that name the experiment, in the order the scripts write them.
RESULT_KEYS = tuple(runs.result_fields(config.training_settings(train.parse_args([])), "baseline", ""))


def results_row(seed: int, rng: np.random.Generator, **keys: object) -> dict[str, object]:
    row: dict[str, object] = {"dataset": "voc2007", "split": "test", "selection_split": "holdout",
                              "model": "resnet18", "method": "baseline", "teacher": "", "seed": seed, "epochs": 20,
                              "img_size": 448, "difficult": "positive", "eval_difficult": "ignore",
                              "commit": "0" * 40, "dirty": "no"}
    row.update(keys)
    row.update({name: float(rng.uniform(10, 95)) for name in METRIC_NAMES})
    row.update(best_epoch=3, checkpoint=f"/runs/{seed}/{keys.get('method', 'baseline')}/best.safetensors")
    assert list(row)[: len(RESULT_KEYS)] == list(RESULT_KEYS)  # the order runs.result_fields writes
    return row


def write_run(root: str, name: str, row: dict[str, object], epochs: int = 0, args: dict | None = None) -> str:
    """A run directory as train.py leaves it: results.csv, and summary.csv / args.yaml when asked."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    append_csv_row(os.path.join(run_dir, "results.csv"), row)
    for epoch in range(epochs):
        append_csv_row(os.path.join(run_dir, "summary.csv"),
                       {"epoch": epoch, "lr": 0.01, "train_loss": 1.0 / (epoch + 1), "map": 50.0 + epoch,
                        "ece": 10.0 - epoch})
    if args is not None:
        with open(os.path.join(run_dir, "args.yaml"), "w") as handle:
            yaml.safe_dump(args, handle)
    return run_dir


@pytest.fixture
def fake_runs(tmp_path) -> tuple[list[str], list[dict], list[dict]]:
    """Two seeds of (voc2007, resnet18, baseline), one seed of (voc2007, resnet18, cal)."""
    rng = np.random.default_rng(0)
    baseline = [results_row(seed, rng) for seed in (0, 1)]
    cal = [results_row(0, rng, method="cal")]
    dirs = [write_run(str(tmp_path), f"baseline_s{row['seed']}", row, epochs=3) for row in baseline]
    dirs.append(write_run(str(tmp_path), "cal_s0", cal[0], epochs=2))
    return dirs, baseline, cal


def test_statistics_over_seeds_match_numpy(fake_runs) -> None:
    dirs, baseline, cal = fake_runs
    summary = report.summarise(report.load_results(dirs))
    assert list(summary["method"]) == ["baseline", "cal"] and list(summary["n"]) == [2, 1]
    two = summary.iloc[0]
    assert two["seeds"] == "0/1"
    for column, _ in report.PAPER_COLUMNS:
        values = np.array([row[column] for row in baseline])
        best, worst = (values.min(), values.max()) if column == "ece" else (values.max(), values.min())
        assert two[f"{column}_mean"] == pytest.approx(values.mean())
        assert two[f"{column}_std"] == pytest.approx(values.std(ddof=1))
        assert (two[f"{column}_best"], two[f"{column}_worst"]) == pytest.approx((best, worst))
    one = summary.iloc[1]
    assert one["map_mean"] == pytest.approx(cal[0]["map"]) and math.isnan(one["map_std"])
    assert one["map_best"] == one["map_worst"] == pytest.approx(cal[0]["map"])


def test_a_run_given_twice_or_finished_twice_counts_once(fake_runs) -> None:
    dirs, baseline, _ = fake_runs
    rerun = {**baseline[0], "map": 1.0}  # the same checkpoint evaluated again (--resume of a finished run)
    append_csv_row(os.path.join(dirs[0], "results.csv"), rerun)
    df = report.load_results([*dirs, os.path.join(dirs[0], "results.csv")])
    assert len(df) == 3 and 1.0 in set(df["map"])


def test_markdown_has_a_header_and_one_row_per_group(fake_runs) -> None:
    dirs, baseline, _ = fake_runs
    text = report.to_markdown(report.summarise(report.load_results(dirs)))
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:7] == ["Dataset", "Split", "Model", "Method", "Teacher", "n", "Epochs"]
    assert header[7:] == PAPER_HEADINGS
    assert len(table) == 2 + 2  # header, separator, two groups
    first = [cell.strip() for cell in table[2].strip("|").split("|")]
    maps = [row["map"] for row in baseline]
    assert first[3] == "baseline" and first[4] == "-" and first[5] == "2"
    assert first[7] == f"{np.mean(maps):.2f} ± {np.std(maps, ddof=1):.2f} ({min(maps):.2f}–{max(maps):.2f})"
    single = [cell.strip() for cell in table[3].strip("|").split("|")]
    assert single[7].endswith("± -")


def test_csv_format_parses_back(fake_runs, capsys) -> None:
    dirs, baseline, _ = fake_runs
    report.main([*dirs, "--format", "csv"])
    parsed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(parsed) == 2 and {"n", "map_mean", "map_std", "map_best", "map_worst", "ece_best"} <= set(parsed)
    assert parsed.loc[0, "map_mean"] == pytest.approx(np.mean([row["map"] for row in baseline]))
    assert math.isnan(parsed.loc[1, "map_std"])


def test_paper_column_is_ours_minus_the_published_map(fake_runs, capsys) -> None:
    dirs, baseline, _ = fake_runs
    summary = report.add_paper(report.summarise(report.load_results(dirs)))
    mean = np.mean([row["map"] for row in baseline])
    assert summary.loc[0, "paper_map"] == 88.91 and summary.loc[0, "paper_source"] == "Table 2a"
    assert summary.loc[0, "map_diff"] == pytest.approx(mean - 88.91)
    assert summary.loc[1, "paper_map"] == 89.50
    report.main([*dirs, "--paper"])
    line = [row for row in capsys.readouterr().out.splitlines() if "| baseline |" in row][0]
    assert line.rstrip(" |").endswith(f"88.91 (Table 2a) | {mean - 88.91:+.2f}")


def test_teacher_is_named_by_its_checkpoint_model_and_tags_do_not_hide_paper_numbers(tmp_path) -> None:
    teacher = tmp_path / "teacher_run" / "best.safetensors"
    teacher.parent.mkdir()
    save_file({"w": torch.zeros(1)}, str(teacher), metadata={"model": "resnet101.tv_in1k"})
    rng = np.random.default_rng(1)
    gone = "/gone/r101_cal_s0/best.safetensors"
    dirs = [write_run(str(tmp_path), "ud", results_row(0, rng, model="resnet18.tv_in1k", method="ud",
                                                       teacher=str(teacher))),
            write_run(str(tmp_path), "kd", results_row(0, rng, method="kd", teacher=gone))]
    summary = report.add_paper(report.summarise(report.load_results(dirs)))
    by_method = summary.set_index("method")
    assert by_method.loc["ud", "teacher"] == "resnet101.tv_in1k" and by_method.loc["ud", "paper_map"] == 91.67
    assert by_method.loc["kd", "teacher"] == "r101_cal_s0" and math.isnan(by_method.loc["kd", "paper_map"])


def test_by_splits_groups_with_args_yaml_values(tmp_path) -> None:
    rng = np.random.default_rng(2)
    dirs = [write_run(str(tmp_path), f"run{i}", results_row(i, rng), args={"reprob": reprob, "sched": "cosine"})
            for i, reprob in enumerate((0.0, 0.5, 0.5))]
    summary = report.summarise(report.load_results(dirs, by=["reprob"]), by=["reprob"])
    assert list(zip(summary["reprob"], summary["n"], strict=True)) == [("0.0", 1), ("0.5", 2)]
    with pytest.raises(report.ReportError, match="no 'drop'"):
        report.load_results(dirs, by=["drop"])


def test_mixed_settings_and_repeated_seeds_are_warned_about(tmp_path) -> None:
    rng = np.random.default_rng(3)
    dirs = [write_run(str(tmp_path), "a", results_row(0, rng)),
            write_run(str(tmp_path), "b", results_row(0, rng, epochs=1)),
            write_run(str(tmp_path), "c", results_row(1, rng, selection_split="test"))]  # --select-on-test
    warnings = report.group_warnings(report.summarise(report.load_results(dirs)))
    assert any("epochs 1/20" in warning for warning in warnings) and any("seeds 0" in warning for warning in warnings)
    assert any("selection_split test/holdout" in warning for warning in warnings)


def test_validate_rows_without_seed_group_by_subset(tmp_path) -> None:
    rng = np.random.default_rng(6)
    rows = []
    for number, subset in enumerate(("all", "difficult", "all")):
        row = results_row(0, rng, subset=subset)
        del row["seed"]
        row["checkpoint"] = f"/runs/{number}/best.safetensors"
        rows.append(row)
    path = tmp_path / "validated.csv"
    for row in rows:
        append_csv_row(str(path), row)
    summary = report.summarise(report.load_results([str(path)]))
    assert list(zip(summary["split"], summary["n"], strict=True)) == [("test", 2), ("test:difficult", 1)]
    assert report.group_warnings(summary) == []


def test_a_row_at_another_topk_leaves_the_top3_columns_empty(tmp_path) -> None:
    row = results_row(0, np.random.default_rng(7))
    row = dict(zip(metric_names(5), (row.pop(name) for name in METRIC_NAMES), strict=True)) | row
    path = str(tmp_path / "validated.csv")
    append_csv_row(path, row)  # as validate.py --topk 5 --results-file writes it
    line = report.to_markdown(report.summarise(report.load_results([path]))).splitlines()[2]
    cells = dict(zip(["Dataset", "Split", "Model", "Method", "Teacher", "n", "Epochs", *PAPER_HEADINGS],
                     (cell.strip() for cell in line.strip("|").split("|")), strict=True))
    assert cells["mAP"] == f"{row['map']:.2f} ± -"
    assert all(cells[heading] == "-" for heading in PAPER_HEADINGS if heading.endswith("@3"))


def test_bad_input_names_the_path(tmp_path) -> None:
    with pytest.raises(report.ReportError, match="nowhere"):
        report.load_results([str(tmp_path / "nowhere")])
    empty_run = tmp_path / "unfinished"
    empty_run.mkdir()
    with pytest.raises(report.ReportError, match="unfinished: no results.csv"):
        report.load_results([str(empty_run)])
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(report.ReportError, match=r"other\.csv.*lacks the columns"):
        report.load_results([str(other)])
    row = results_row(0, np.random.default_rng(4))
    row["map"] = "oops"
    run = write_run(str(tmp_path), "broken", row)
    with pytest.raises(report.ReportError, match="broken.*map holds 'oops'"):
        report.load_results([run])


def test_plot_writes_a_png_of_three_panels(fake_runs, tmp_path) -> None:
    dirs, _, _ = fake_runs
    figure = report.training_curves(dirs)
    assert len(figure.axes) == 3
    assert [len(line.get_xdata()) for line in figure.axes[0].get_lines()] == [3, 3, 2]
    no_summary = write_run(str(tmp_path), "validated_only", results_row(5, np.random.default_rng(5)))
    out = str(tmp_path / "plots" / "curves.png")
    assert report.plot_curves([*dirs, no_summary], out) == [no_summary]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > image.height
    assert not [name for name in os.listdir(tmp_path / "plots") if name != "curves.png"]  # no temporary left


@pytest.mark.slow
def test_report_over_two_real_runs(tiny_digits: str, tmp_path, capsys) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only spin-waits on shared cores (see test_hparams.py)
    try:
        rows = [train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", f"seed{seed}", "--seed",
                                           str(seed))) for seed in (0, 1)]
    finally:
        torch.set_num_threads(previous)
    dirs = [str(tmp_path / f"seed{seed}") for seed in (0, 1)]
    report.main([*dirs, "--plot", str(tmp_path / "curves.png")])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| digits")]
    assert len(table) == 1 and "| test_resnet | baseline | - | 2 | 2 |" in table[0]
    summary = report.summarise(report.load_results(dirs))
    maps = [row["map"] for row in rows]
    assert summary.loc[0, "map_mean"] == pytest.approx(np.mean(maps))
    assert summary.loc[0, "map_std"] == pytest.approx(np.std(maps, ddof=1))
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG"
