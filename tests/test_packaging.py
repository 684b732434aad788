"""pyproject.toml: `pip install` gives a working udtimm (the Predictor on a checkpoint) outside the checkout."""

import os
import shutil
import subprocess
import sys
import venv

import pytest
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_package_declares_its_build_and_dependencies_as_ranges() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    dependencies = project["project"]["dependencies"]
    assert all(">=" in spec and "==" not in spec for spec in dependencies)
    with open(os.path.join(ROOT, "requirements.txt")) as handle:
        pinned = {line.split("==")[0].split(">=")[0].strip().lower() for line in handle
                  if line.strip() and not line.startswith("#")}
    # Every dependency of the library is in the set CI installs (which adds the tools and optional parts).
    assert {spec.split(">=")[0].lower() for spec in dependencies} - {"numpy", "pillow"} <= pinned


@pytest.mark.slow
def test_a_wheel_installs_and_its_predictor_labels_images_outside_the_checkout(tiny_checkpoint: str,
                                                                              tmp_path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "udtimm"), source / "udtimm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("udtimm-*.whl")
    # The pinned torch and the other dependencies come from this interpreter's packages, as pip would take them.
    venv.create(tmp_path / "env", system_site_packages=True, with_pip=False)
    python = str(tmp_path / "env" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    script = ("import torch, udtimm; from udtimm import Predictor; "
              f"p = Predictor.from_checkpoint({tiny_checkpoint!r}); "
              "t = p.predict(torch.zeros(2, 3, 40, 40, dtype=torch.uint8)); "
              "print(udtimm.__file__); print(len(t), list(t.columns[:2]))")
    done = subprocess.run([python, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    installed, table = done.stdout.splitlines()
    assert installed.startswith(str(tmp_path / "env")) and table == "2 ['image', 'labels']"
