"""The paper's claims checked on repeated runs: paired differences over seeds and a verdict (python -m udtimm.claims).

    python -m udtimm.claims output/distill-digits/*/ --model test_resnet     # Markdown table, one row per claim

Each claim compares two methods of one model on one metric, seed by seed (the runs of a seed share their start
and data order, so the paired difference is the method's effect). The verdict reads the 95 % confidence interval
of the mean paired difference (Student's t, n - 1 degrees of freedom): "holds" when it lies wholly on the claimed
side of zero, "does not hold" when it lies wholly on the other side, "within noise" when it contains zero. The
table also gives the interval itself, the smallest effect that the runs detect with 80 % power (a two-sided paired
t test at 5 %, with the measured spread), and the paper's own effect where it gives one.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from scipy import stats

from udtimm.attention import ATTENTION_VARIANTS, DEFAULT_VARIANT
from udtimm.objectives import ud_method
from udtimm.report import expand, load_results


@dataclass(frozen=True)
class Claim:
    text: str
    method: str  # results.csv's method column
    against: str
    metric: str  # results.csv's metric column
    lower_is_better: bool = False
    paper: str = "-"  # the paper's own effect on its benchmark, as printed in the table
    against_metric: str | None = None  # `against`'s column, when not `metric` (a last epoch against a chosen one)
    # Self-distillation: the claim is about the distilled half, so a seed whose chosen epoch (best_epoch) comes
    # before half of its epochs measures nothing about it.
    needs_distilled_epoch: bool = False


def paper_claims(variant: str = DEFAULT_VARIANT, other_variants: Sequence[str] = ()) -> tuple[Claim, ...]:
    """The paper's claims, UD being `variant`; each of `other_variants` adds its own row against UD w/o attention."""
    return (
        Claim("`--cal` lowers classwise ECE", "cal", "baseline", "ece", lower_is_better=True),
        Claim("`--cal` raises Difficult mAP", "cal", "baseline", "map_difficult"),
        Claim("KD beats the baseline", "kd", "baseline", "map"),
        Claim("UD without attention beats KD", "ud-noatt", "kd", "map"),
        Claim("UD beats UD without attention", ud_method(variant), "ud-noatt", "map"),
        Claim("Self-distillation beats the baseline", f"self-{ud_method(variant)}", "baseline", "map"),
        *(Claim(f"UD (`--att-variant {other}`) beats UD without attention", ud_method(other), "ud-noatt", "map")
          for other in other_variants if other != variant),
    )


def paired_differences(results: pd.DataFrame, claim: Claim) -> pd.Series:
    """method's claim.metric - against's (claim.against_metric or claim.metric), one value per seed that both
    methods ran (index: seed)."""
    method = results[results["method"] == claim.method].groupby("seed")[claim.metric].mean()
    against = results[results["method"] == claim.against].groupby("seed")[claim.against_metric or claim.metric].mean()
    return (method - against).dropna()


def undistilled_seeds(results: pd.DataFrame, claim: Claim) -> int:
    """With claim.needs_distilled_epoch, the number of claim.method's runs whose chosen epoch is not distilled."""
    if not claim.needs_distilled_epoch:
        return 0
    runs = results[results["method"] == claim.method]
    return int((runs["best_epoch"].astype(int) < runs["epochs"].astype(int) // 2).sum())


def interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The mean of the paired differences and the half-width of its Student's t confidence interval."""
    values = pd.Series([float(value) for value in differences])
    half_width = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half_width)


def detectable_effect(differences: Sequence[float], power: float = 0.8, confidence: float = 0.95) -> float:
    """The smallest true mean difference that a two-sided paired t test at 1 - `confidence` finds with `power`, given
    the spread of `differences` and their number (the usual approximation: (t_(1-a/2) + t_power) s / sqrt(n))."""
    n = len(differences)
    quantiles = stats.t.ppf(0.5 + confidence / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(quantiles * pd.Series([float(value) for value in differences]).std(ddof=1) / math.sqrt(n))


def verdict(differences: Sequence[float], lower_is_better: bool = False, confidence: float = 0.95) -> str:
    """Where the t confidence interval of the mean difference lies against zero, read in the claimed direction."""
    if len(differences) < 2:
        return "not measured"
    mean, half_width = interval(differences, confidence)
    better = -mean if lower_is_better else mean
    if better - half_width > 0:
        return "holds"
    if better + half_width < 0:
        return "does not hold"
    return "within noise"


def _mean_std(values: pd.Series) -> str:
    if values.empty:
        return "-"
    std = values.std(ddof=1) if len(values) > 1 else math.nan
    return f"{values.mean():.2f} ± {std:.2f}" if not math.isnan(std) else f"{values.mean():.2f}"


def claims_table(results: pd.DataFrame, claims: Sequence[Claim]) -> pd.DataFrame:
    """One row per claim: the paper's effect, both methods' mean ± std over seeds, the paired difference's
    mean ± std, its 95 % interval, the smallest effect detected with 80 % power, n, verdict ("not measured" when a
    self-distillation claim's chosen epoch is undistilled in any seed)."""
    rows = []
    for claim in claims:
        differences = paired_differences(results, claim)
        seeds = differences.index
        values = {method: results[(results["method"] == method) & results["seed"].isin(seeds)][metric]
                  for method, metric in ((claim.method, claim.metric),
                                         (claim.against, claim.against_metric or claim.metric))}
        measured = len(differences) > 1
        undistilled = undistilled_seeds(results, claim)
        not_measured = (f"not measured: val chose an epoch before distillation in {undistilled} of "
                        f"{len(differences)} seeds") if undistilled else ""
        mean, half_width = interval(differences.tolist()) if measured else (math.nan, math.nan)
        rows.append({
            "claim": claim.text, "metric": claim.metric, "paper": claim.paper,
            "method": f"{claim.method}: {_mean_std(values[claim.method])}",
            "against": f"{claim.against}: {_mean_std(values[claim.against])}",
            "difference": _mean_std(differences),
            "95 % interval": f"[{mean - half_width:.2f}, {mean + half_width:.2f}]" if measured else "-",
            "detectable": f"{detectable_effect(differences.tolist()):.2f}" if measured else "-",
            "n": len(differences), "verdict": not_measured or verdict(differences.tolist(), claim.lower_is_better),
        })
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories or results.csv files (globs are expanded)")
    parser.add_argument("--model", default=None, help="only the runs of this model (the students)")
    parser.add_argument("--att-variant", default=DEFAULT_VARIANT, choices=tuple(ATTENTION_VARIANTS),
                        help="the UD runs that stand for UD; the runs of the other variants get a row each")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    results = load_results(expand(args.paths))
    if args.model:
        results = results[results["model"] == args.model]
    text = to_markdown(claims_table(results, paper_claims(args.att_variant, tuple(ATTENTION_VARIANTS))))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
