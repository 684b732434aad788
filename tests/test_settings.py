import ast
import dataclasses
import os

import distill
import train
from udtimm import config, data_flags, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_settings_carry_every_shared_flag_with_its_value() -> None:
    args = train.parse_args(["--dataset", "voc2007", "--data-dir", "/data", "-b", "8", "--lr", "0.1", "--seed", "4"])
    built = config.training_settings(args)
    assert built.data.source.name == "voc2007" and built.data.source.root == "/data" and built.data.batch_size == 8
    assert built.optim.lr == 0.1 and built.runtime.seed == 4 and built.model.model == args.model
    assert built.data.crop_scales == tuple(args.crop_scales) and built.saved_args["lr"] == 0.1
    shared = {field.name for part in (settings.DataSettings, settings.ModelSettings, settings.OptimSettings,
                                      settings.RuntimeSettings, settings.MixingSettings)
              for field in dataclasses.fields(part)}
    flags = set(vars(distill.parse_args(["--self-distill"]))) & set(vars(args))
    assert shared - {"source"} <= flags  # every field is a flag both scripts have


def test_model_settings_named_by_their_model_alone_are_the_flags_defaults() -> None:
    """A checkpoint's rebuilt model, a benchmark's teacher and the tests name the model and what differs only."""
    for args in (train.parse_args(["--model", "test_resnet"]),
                 distill.parse_args(["--model", "test_resnet", "--self-distill"])):
        assert config.settings_from(settings.ModelSettings, args) == settings.ModelSettings("test_resnet")


def test_digits_options_reach_the_data_source() -> None:
    args = train.parse_args(["--digits-trainval", "50", "--digits-test", "20", "--digits-seed", "3",
                             "--digits-ambiguous"])
    assert data_flags.data_source(args).options == {"num_trainval": 50, "num_test": 20, "seed": 3, "ambiguous": True}
    assert data_flags.data_source(args, "voc2007").options == {}


def namespace_parameters(path: str) -> list[str]:
    """Functions of `path` with a parameter annotated argparse.Namespace."""
    with open(path) as handle:
        tree = ast.parse(handle.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if any(arg.annotation is not None and "Namespace" in ast.unparse(arg.annotation) for arg in arguments):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}")
    return found


def test_no_function_below_the_scripts_takes_the_namespace() -> None:
    """Only the flag modules (config.py, data_flags.py, flags.py), which turn the parsed flags into settings, see
    argparse's Namespace."""
    flag_modules = {os.path.join(ROOT, "udtimm", name) for name in ("config.py", "data_flags.py", "flags.py")}
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "udtimm")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path not in flag_modules:
                offenders += namespace_parameters(path)
    assert offenders == []
