"""udtimm.claims: paired differences over seeds, the t-interval verdict against scipy, the Markdown table."""

import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import results_row, write_run

from udtimm import claims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_verdict_reads_the_t_interval_of_the_mean_difference() -> None:
    differences = [0.9, 1.1, 1.3]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(differences), scale=stats.sem(differences))
    assert low > 0 and claims.verdict(differences) == "holds"
    assert claims.verdict([-d for d in differences]) == "does not hold"
    assert claims.verdict([-d for d in differences], lower_is_better=True) == "holds"
    assert claims.verdict([1.0, -0.5, 2.0]) == "within noise"
    assert claims.verdict([1.0]) == "not measured"
    # Just inside and just outside the interval's edge, as scipy draws it.
    spread = [-1.0, 0.0, 1.0]
    half = stats.t.ppf(0.975, 2) * stats.sem(spread)
    assert claims.verdict([value + half * 0.99 for value in spread]) == "within noise"
    assert claims.verdict([value + half * 1.01 for value in spread]) == "holds"


def test_interval_and_detectable_effect_agree_with_scipy() -> None:
    differences = list(np.random.default_rng(3).normal(0.3, 0.5, 10))
    mean, half_width = claims.interval(differences)
    low, high = stats.t.interval(0.95, 9, loc=np.mean(differences), scale=stats.sem(differences))
    assert mean == pytest.approx((low + high) / 2) and half_width == pytest.approx((high - low) / 2)
    # The exact power of the two-sided paired t test (noncentral t) at the detectable effect is 80 %.
    effect = claims.detectable_effect(differences)
    noncentrality = effect / np.std(differences, ddof=1) * np.sqrt(10)
    critical = stats.t.ppf(0.975, 9)
    power = stats.nct.sf(critical, 9, noncentrality) + stats.nct.cdf(-critical, 9, noncentrality)
    assert power == pytest.approx(0.8, abs=0.005)


def _results() -> pd.DataFrame:
    rows = []
    for seed, (baseline, kd, ece_base, ece_cal) in enumerate([(80.0, 81.0, 5.0, 4.0), (82.0, 83.5, 6.0, 5.5),
                                                                (81.0, 82.0, 5.5, 4.4)]):
        rows += [{"method": "baseline", "seed": seed, "map": baseline, "map_difficult": 70.0, "ece": ece_base},
                 {"method": "cal", "seed": seed, "map": baseline, "map_difficult": 70.0 + seed - 1, "ece": ece_cal},
                 {"method": "kd", "seed": seed, "map": kd, "map_difficult": 70.0, "ece": 5.0}]
    return pd.DataFrame(rows)


def test_claims_table_pairs_runs_by_seed() -> None:
    table = claims.claims_table(_results(), claims.paper_claims()).set_index("claim")
    kd = table.loc["KD beats the baseline"]
    assert kd["n"] == 3 and kd["difference"] == f"{np.mean([1.0, 1.5, 1.0]):.2f} ± {np.std([1, 1.5, 1], ddof=1):.2f}"
    assert kd["method"] == "kd: 82.17 ± 1.26" and kd["verdict"] == "holds"
    low, high = stats.t.interval(0.95, 2, loc=np.mean([1.0, 1.5, 1.0]), scale=stats.sem([1.0, 1.5, 1.0]))
    assert kd["95 % interval"] == f"[{low:.2f}, {high:.2f}]" and kd["paper"] == "-"
    assert table.loc["`--cal` lowers classwise ECE", "verdict"] == "holds"
    assert table.loc["`--cal` raises Difficult mAP", "verdict"] == "within noise"
    assert table.loc["UD beats UD without attention", "verdict"] == "not measured"  # no such runs
    assert table.loc["UD beats UD without attention", "n"] == 0


def test_a_claim_can_compare_a_last_epoch_with_a_chosen_one() -> None:
    results = _results()
    results["last_map"] = results["map"] - 2.0
    claim = claims.Claim("kd's last epoch beats the baseline", "kd", "baseline", "last_map", against_metric="map")
    row = claims.claims_table(results, [claim]).iloc[0]
    assert row["difference"] == f"{np.mean([-1.0, -0.5, -1.0]):.2f} ± {np.std([1, 0.5, 1], ddof=1):.2f}"
    assert row["method"] == "kd: 80.17 ± 1.26" and row["against"] == "baseline: 81.00 ± 1.00"


def test_self_distillation_chosen_before_its_distilled_half_is_not_measured() -> None:
    results = _results()
    results["epochs"], results["best_epoch"] = 16, [9, 9, 9, 9, 9, 6, 9, 9, 12]  # the second seed's kd: epoch 6
    claim = claims.Claim("kd stands in for self-distillation", "kd", "baseline", "map", needs_distilled_epoch=True)
    row = claims.claims_table(results, [claim]).iloc[0]
    assert row["verdict"] == "not measured: val chose an epoch before distillation in 1 of 3 seeds"
    assert row["95 % interval"] != "-"  # the numbers stay, for what they are
    results["best_epoch"] = 8
    assert claims.claims_table(results, [claim]).iloc[0]["verdict"] == "holds"


def test_variants_name_their_own_runs() -> None:
    names = [claim.method for claim in claims.paper_claims("const-weights", ("paper", "const-weights", "gradcam"))]
    assert "ud-const-weights" in names and "self-ud-const-weights" in names and names[-2:] == ["ud", "ud-gradcam"]


def test_cli_reads_run_directories(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    for seed in range(3):
        for method, shift in (("baseline", 0.0), ("kd", 2.0)):
            row = results_row(seed, rng, method=method, model="test_resnet")
            row["map"] = 50.0 + seed + shift + 0.1 * rng.standard_normal()
            write_run(str(tmp_path), f"{method}-{seed}", row)
    text = claims.main([str(tmp_path / "*"), "--model", "test_resnet", "--out", str(tmp_path / "claims.md")])
    assert text == (tmp_path / "claims.md").read_text() and text.startswith("| claim | metric |")
    kd_line = next(line for line in text.splitlines() if line.startswith("| KD beats the baseline"))
    assert kd_line.endswith("| 3 | holds |")
