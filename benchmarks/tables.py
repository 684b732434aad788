"""The README's and docs' result tables, made from the committed long tables in benchmarks/results/.

    python -m benchmarks.tables              # print every table
    python -m benchmarks.tables --write      # rewrite the generated blocks of README.md and docs/*.md in place

A generated block is the lines between `<!-- table: NAME -->` and `<!-- end table -->`, NAME a key of TABLES;
tests/test_benchmarks_tables.py checks that every block equals what its function makes from the committed files,
so no number in those tables can drift from the runs it came from.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any directory

from benchmarks import (  # noqa: E402
    calibration_digits,
    distill_digits,
    heads_digits,
    long_tail_digits,
    missing_labels_digits,
    scale,
)
from benchmarks.common import RESULTS_DIR, ROOT  # noqa: E402
from udtimm.claims import Claim, claims_table, interval, paired_differences, to_markdown  # noqa: E402
from udtimm.io import atomic_write_text, read_text  # noqa: E402

DOCUMENTS = ("README.md", *(os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if name.endswith(".md")))
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)


def results_table(name: str) -> pd.DataFrame:
    """benchmarks/results/<name>.csv with each run's arm as its method, numbers as numbers."""
    return distill_digits.arm_results(pd.read_csv(os.path.join(RESULTS_DIR, f"{name}.csv"), dtype=str,
                                                  keep_default_na=False))


def signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def short_claims(results: pd.DataFrame, claims: Sequence[Claim]) -> str:
    """Markdown: claim, the paper's effect, the measured paired difference with its 95 % interval, the verdict."""
    lines = ["| claim | paper (ResNet-18, VOC) | measured [95 % interval] | verdict |", "|---|---|---|---|"]
    verdicts = claims_table(results, claims).set_index("claim")["verdict"]
    for claim in claims:
        mean, half = interval(paired_differences(results, claim).tolist())
        lines.append(f"| {claim.text} | {claim.paper} | {signed(mean)} [{signed(mean - half)}, "
                     f"{signed(mean + half)}] | {verdicts[claim.text]} |")
    return "\n".join(lines) + "\n"


def distill_claims_short() -> str:
    return short_claims(results_table("distill_digits"), (*distill_digits.CLAIMS, *distill_digits.POST_HOC))


def distill_arms() -> str:
    return distill_digits.arm_table(results_table("distill_digits"))


def distill_claims() -> str:
    claims = (*distill_digits.CLAIMS, *distill_digits.POST_HOC)
    return to_markdown(claims_table(results_table("distill_digits"), claims))


def distill_defaults() -> str:
    return to_markdown(claims_table(results_table("distill_digits"), distill_digits.DEFAULT_CHOICE))


def missing_labels_short() -> str:
    """Markdown: per dropped fraction, each arm's test mAP and the part of the gap it closes."""
    results = results_table("missing_labels_digits")
    arms = list(missing_labels_digits.ARMS)
    lines = ["| dropped | " + " | ".join(f"`{arm}`" for arm in arms) + " |", "|---|" + "---|" * len(arms)]
    for fraction in sorted(set(results["dropped"].dropna())):
        full = results[results["arm"] == missing_labels_digits.FULL]
        gap = missing_labels_digits.gap_closed(pd.concat([full, results[results["dropped"] == fraction]]))
        cells = [f"{row['map']:.2f}" + ("" if arm == "negative" else f" ({100 * row['gap closed']:.0f} %)")
                 for arm, row in gap.set_index("arm").iterrows()]
        lines.append(f"| {100 * fraction:.0f} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def missing_labels() -> str:
    results = results_table("missing_labels_digits")
    return "".join(missing_labels_digits.fraction_tables(results, fraction)
                   for fraction in sorted(set(results["dropped"].dropna())))


def calibrated(method: str) -> pd.DataFrame:
    """calibration_digits' rows before and after `--calibrate method`, from its long table."""
    table = pd.read_csv(os.path.join(RESULTS_DIR, f"calibration_digits_{method}.csv"))
    return calibration_digits.before_and_after([(row["arm"], int(row["seed"]), row) for _, row in table.iterrows()],
                                               method)


def calibration_short() -> str:
    """Markdown: per student, classwise ECE before and after each calibration, and mAP (which none changes)."""
    after = {method: calibrated(method) for method in ("per-class", "platt")}
    lines = ["| student | classwise ECE | per-class temperatures | Platt | mAP |", "|---|---|---|---|---|"]
    for arm in calibration_digits.ARMS:
        before = after["platt"][after["platt"]["method"] == arm]
        cells = [distill_digits.mean_std(results[results["method"] == f"{arm}+{method}"]["ece"])
                 for method, results in after.items()]
        lines.append(f"| {arm} | {distill_digits.mean_std(before['ece'])} | " + " | ".join(cells)
                     + f" | {distill_digits.mean_std(before['map'])} |")
    return "\n".join(lines) + "\n"


def calibration(method: str) -> str:
    results = calibrated(method)
    return (calibration_digits.means_table(results, method) + "\n"
            + to_markdown(claims_table(results, calibration_digits.claims(method))))


def long_tail_arms() -> str:
    results = results_table("long_tail_digits")
    return (distill_digits.arm_table(results, long_tail_digits.SUMMARY)
            + f"\nHighest mean val mAP (the registered choice): `--loss {long_tail_digits.recommended(results)}`.\n")


def long_tail_short() -> str:
    """Markdown: per loss, test mAP, tail mAP and mAP with `--cal`, mean ± std over seeds."""
    results = results_table("long_tail_digits")
    lines = ["| `--loss` | mAP | tail mAP | with `--cal` |", "|---|---|---|---|"]
    for loss in long_tail_digits.LOSSES:
        cells = [distill_digits.mean_std(results[results["method"] == arm][metric])
                 for arm, metric in ((loss, "map"), (loss, "map_tail"), (f"{loss}+cal", "map"))]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heads_pretrained_short() -> str:
    """Markdown: per head, test mAP of each pretrained-setting variant, mean ± std over seeds."""
    results = results_table("heads_digits_pretrained")
    variants = (("", "`--head-lr-mult 1`"), ("-lr10", "10"), ("-lr10+mix", "10 + mixing"),
                ("-lr10-long", "10, 16 epochs"))
    lines = ["| head | " + " | ".join(heading for _, heading in variants) + " |", "|---|" + "---|" * len(variants)]
    for head in heads_digits.HEADS:
        cells = [distill_digits.mean_std(results[results["method"] == f"{head}{suffix}"]["map"])
                 for suffix, _ in variants]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "distill-claims-short": distill_claims_short,
    "distill-arms": distill_arms,
    "distill-claims": distill_claims,
    "distill-defaults": distill_defaults,
    "missing-labels-short": missing_labels_short,
    "missing-labels": missing_labels,
    "calibration-short": calibration_short,
    "calibration-per-class": lambda: calibration("per-class"),
    "calibration-platt": lambda: calibration("platt"),
    "scale": lambda: scale.scale_table(pd.read_csv(os.path.join(RESULTS_DIR, "scale.csv"))),
    "scale-short": lambda: scale.scale_short(pd.read_csv(os.path.join(RESULTS_DIR, "scale.csv"))),
    "long-tail-short": long_tail_short,
    "long-tail-arms": long_tail_arms,
    "long-tail-claims": lambda: to_markdown(claims_table(results_table("long_tail_digits"), long_tail_digits.CLAIMS)),
    "heads-pretrained-short": heads_pretrained_short,
    "heads-pretrained-arms": lambda: distill_digits.arm_table(results_table("heads_digits_pretrained")),
    "heads-pretrained-claims": lambda: to_markdown(claims_table(results_table("heads_digits_pretrained"),
                                                                heads_digits.PRETRAINED_CLAIMS)),
}
# The long table (benchmarks/results/<name>.csv) each table is made from.
SOURCES = {**{name: "distill_digits" for name in TABLES if name.startswith("distill")},
           **{name: "missing_labels_digits" for name in TABLES if name.startswith("missing")},
           "calibration-short": "calibration_digits_platt", "calibration-per-class": "calibration_digits_per-class",
           "calibration-platt": "calibration_digits_platt", "scale": "scale", "scale-short": "scale",
           **{name: "long_tail_digits" for name in TABLES if name.startswith("long-tail")},
           **{name: "heads_digits_pretrained" for name in TABLES if name.startswith("heads-pretrained")}}


def fill_blocks(text: str, tables: dict[str, str]) -> str:
    """`text` with each generated block's body replaced by its table; an unknown NAME is an error."""
    def body(match: re.Match) -> str:
        if match["name"] not in tables:
            raise KeyError(f"<!-- table: {match['name']} -->: no such table (known: {', '.join(TABLES)})")
        return match.group(1) + tables[match["name"]] + match.group(4)
    return BLOCK.sub(body, text)


def used_tables() -> dict[str, str]:
    """The tables that some document's block names, made once each."""
    names = {match["name"] for path in DOCUMENTS for match in BLOCK.finditer(read(path))}
    return {name: TABLES[name]() for name in sorted(names) if name in TABLES}


def read(path: str) -> str:
    return read_text(os.path.join(ROOT, path))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the blocks of README.md and docs/*.md")
    args = parser.parse_args(argv)
    if not args.write:
        for name, make in TABLES.items():
            print(f"<!-- table: {name} -->\n{make()}<!-- end table -->\n")
        return
    tables = used_tables()
    for path in DOCUMENTS:
        text = read(path)
        filled = fill_blocks(text, tables)
        if filled != text:
            atomic_write_text(os.path.join(ROOT, path), filled)
            print(f"rewrote {path}")


if __name__ == "__main__":
    main()
