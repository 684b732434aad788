"""cli.py: user errors end a script with one `error:` line, and importing it loads no training stack."""

import os
import runpy
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_DIGITS, tiny_train_args

from udtimm import cli
from udtimm.data.digits import ensure_digits


def corrupt_digits(tmp_path) -> tuple[str, str]:
    """A tiny digits copy with one unreadable training image; returns (data dir, that image's path)."""
    data_dir = str(tmp_path / "digits")
    shutil.copytree(ensure_digits(str(tmp_path / "source"), **TINY_DIGITS), data_dir)
    image_dir = os.path.join(data_dir, "VOC2007", "JPEGImages")
    bad = os.path.join(image_dir, sorted(os.listdir(image_dir))[0])
    with open(bad, "wb") as handle:
        handle.write(b"not a jpeg")
    return data_dir, bad


def run_script(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """What `python <script> <argv>` prints on exit (the `error:` line): the script's own run_script line runs."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return str(exit_info.value.code)


@pytest.mark.slow
def test_a_corrupt_image_read_by_a_worker_is_one_error_line_and_leaves_no_run(tmp_path, monkeypatch, capsys) -> None:
    data_dir, bad = corrupt_digits(tmp_path)
    argv = tiny_train_args(data_dir, str(tmp_path / "out"), "--experiment", "run", "--workers", "1")
    message = run_script("train.py", argv, monkeypatch)
    assert message.startswith("error: ") and "\n" not in message and bad in message
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out" / "run").exists()  # refused before an epoch was saved: nothing left behind
    run_script("train.py", [*argv, "--debug"], monkeypatch)
    assert "Traceback" in capsys.readouterr().err
    # --debug from a -c YAML, as from the command line.
    (tmp_path / "debug.yaml").write_text("debug: true\n")
    assert run_script("train.py", ["-c", str(tmp_path / "debug.yaml"), *argv], monkeypatch) == message
    assert "Traceback" in capsys.readouterr().err


# Modules only training needs: a script that merely runs (predict.py, python -m udtimm.export) must not load them.
TRAINING_STACK = ("udtimm.trainer", "udtimm.runs", "udtimm.engine", "udtimm.optimization", "udtimm.loaders",
                  "udtimm.devices", "timm.optim", "timm.scheduler")


def loaded_modules(statement: str) -> set[str]:
    """The modules loaded by `statement` in a fresh interpreter started in the repository root."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(result.stdout.split())


@pytest.mark.slow
def test_the_command_line_module_loads_no_training_stack() -> None:
    loaded = loaded_modules("import udtimm.cli")
    assert "udtimm.cli" in loaded and "accelerate" not in loaded
    assert not loaded & set(TRAINING_STACK)
    for script in ("import predict", "import udtimm.export"):
        loaded = loaded_modules(script)
        assert "udtimm.cli" in loaded and "accelerate" not in loaded and not loaded & set(TRAINING_STACK), script


def test_an_error_from_a_loader_worker_is_its_last_line() -> None:
    plain = ValueError("bad flag")
    assert cli.user_message(plain) == "bad flag"
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1\nudtimm.data.base.CorruptImageError: a.jpg: not an image\n")
    assert cli.user_message(wrapped) == "udtimm.data.base.CorruptImageError: a.jpg: not an image"
    assert cli.user_message(FileNotFoundError(wrapped.args[0].replace("udtimm.data.base.CorruptImageError",
                                                                      "FileNotFoundError"))) == "a.jpg: not an image"
