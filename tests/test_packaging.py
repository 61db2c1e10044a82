"""The package as a user installs it without -e: a wheel built from the tree holds every module."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("eval", "model")


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_tree(tmp_path):
    source = tmp_path / "src"  # a copy: building in the tree would leave build/ behind
    for name in PACKAGES:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("qwen_eval-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    in_tree = {p.relative_to(source).as_posix() for name in PACKAGES for p in (source / name).rglob("*.py")}
    assert in_tree - in_wheel == set()  # eval/sandbox/* was missing: HumanEval failed after `pip install .`
