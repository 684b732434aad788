"""benchmarks/pretrain_digits.py: the committed backbones are the files weights.json names, and load as such."""

import json
import os

import pytest

from benchmarks import pretrain_digits
from benchmarks.common import ROOT
from udtimm.model import create_model
from udtimm.provenance import file_sha256
from udtimm.settings import ModelSettings


@pytest.mark.parametrize("role", list(pretrain_digits.ARCHITECTURES))
def test_each_committed_backbone_has_the_sha256_its_manifest_names_and_loads(role) -> None:
    with open(os.path.join(ROOT, pretrain_digits.MANIFEST)) as handle:
        entry = json.load(handle)[role]
    path = os.path.join(ROOT, pretrain_digits.weights_path(role))
    assert entry["file"] == pretrain_digits.weights_path(role) and file_sha256(path) == entry["sha256"]
    assert pretrain_digits.pretrained_flags(role) == ("--pretrained-path", entry["file"], "--pretrained-sha256",
                                                      entry["sha256"])
    # The command that made it is the plan's, so regenerating the file reruns the same training.
    assert entry["command"].endswith(" ".join(pretrain_digits.PRETRAIN))
    kwargs = pretrain_digits.ARCHITECTURES[role][3:]
    model_kwargs = {key: json.loads(value) for key, value in (item.split("=") for item in kwargs)}
    create_model(ModelSettings("resnet10t", pretrained_path=path, model_kwargs=model_kwargs), 10)  # refuses a misfit


def test_plan_trains_both_architectures_on_the_pretraining_set(tmp_path) -> None:
    jobs = pretrain_digits.plan(pretrain_digits.parse_args(["--out", str(tmp_path)]))
    assert [job.name for job in jobs] == ["pretrain-teacher", "pretrain-student"]
    for job in jobs:
        command = job.command
        assert command[command.index("--digits-seed") + 1] == "1" and "--digits-ambiguous" not in command
        assert command[command.index("--experiment") + 1] == job.name.removeprefix("pretrain-")
