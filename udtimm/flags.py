"""How udtimm declares its flags: those a resume may not change (add_fixed), warnings for flags that do nothing,
--help's format, KEY=VALUE options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

# A resumed run must be the same experiment: the flags that define it are declared with add_fixed, and
# parse_with_config reads the tags (docs/resuming.md#what-may-not-change lists them; tests/test_config.py checks
# that it does, that each is refused on resume, and that every other flag may change).
FIXED_ON_RESUME = "udtimm_fixed_on_resume"


def add_fixed(group: argparse._ActionsContainer, *names: str, while_on: str = "", **options: object) -> argparse.Action:
    """add_argument for a flag that defines the experiment: a --resume with another value is refused (with
    `while_on`, only while that setting is on). These are the flags that change what the run learns, the images it
    trains on or chooses with, or what its saved state, schedule position or summary.csv columns mean."""
    action = group.add_argument(*names, **options)
    setattr(action, FIXED_ON_RESUME, while_on)
    return action


def warn(line: str) -> None:
    """One `warning:` line on stderr: a flag that does nothing, said before any work."""
    print(f"warning: {line}", file=sys.stderr)


def changed_from_default(args: argparse.Namespace, parser: argparse.ArgumentParser, names: Sequence[str]) -> list[str]:
    """The flags among `names` (settings' names) whose value is not their default, as written on a command line."""
    return [flag_name(name) for name in names if getattr(args, name) != parser.get_default(name)]


def resume_fixed(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The settings of `parser` declared with add_fixed: name -> the setting that must be on for it to be fixed
    ("" for always)."""
    return {action.dest: getattr(action, FIXED_ON_RESUME) for action in parser._actions
            if hasattr(action, FIXED_ON_RESUME)}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the scripts' docstrings as written and ends each option's help with its default (unless it has
    none, or says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class ParseKwargs(argparse.Action):
    """KEY=VALUE pairs into a dict; each value is read as a YAML scalar (16 -> int, true -> bool, avg -> str)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Sequence[str],
                 option_string: str | None = None) -> None:
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} takes KEY=VALUE pairs, got {item!r}")
            kwargs[key.replace("-", "_")] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


def flag_name(key: str) -> str:
    """The command-line flag of an argument's dest: img_size -> --img-size."""
    return "--" + key.replace("_", "-")
