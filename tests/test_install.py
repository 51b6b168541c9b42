"""Packaging: the README's install command, run in a fresh virtual environment that already holds torch,
keeps that torch (a CUDA build stays a CUDA build) and gives a working `gpuxent`; the wheel carries the
version from gpuxent/__init__.py, the LICENSE and py.typed. Needs pip to reach the package index (for
the build backend), as `pip install` itself does."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

import gpuxent

ROOT = Path(__file__).resolve().parents[1]
# the environment of a user's shell: none of the test session's paths or interpreter switches
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}


def readme_install_command() -> str:
    """The README's first `pip install -e` command, without what it runs afterwards (`&& gpuxent bench`)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if "pip install -e" in line and not line.lstrip().startswith("#"):
            return line.split("&& gpuxent")[0].strip().rstrip("&").strip()
    raise AssertionError("README.md shows no `pip install -e` command")


def _run(argv, cwd: Path, timeout=300) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_readme_install_keeps_the_installed_torch(tmp_path):
    command = readme_install_command()
    # a torch already there is kept; only a machine without one gets the pinned CPU build first
    guard = r'python -c "import torch" 2>/dev/null \|\| python -m pip install torch==[0-9.]+; '
    assert re.fullmatch(f"({guard})?" + r'python -m pip install -e "\.\[[a-z0-9,]+\]"', command), command
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    _run(["bash", "-c", f". {venv}/bin/activate && {command}"], cwd=ROOT)  # as a user types it

    probe = (
        "import importlib.metadata as md, json, torch, gpuxent; "
        "print(json.dumps([torch.__version__, torch.__file__, gpuxent.__file__, md.version('gpuxent')]))"
    )
    version, torch_file, gpuxent_file, dist_version = json.loads(_run([venv / "bin/python", "-c", probe], tmp_path))
    assert (version, torch_file) == (torch.__version__, torch.__file__)  # the same torch, not a new one
    assert not list(venv.glob("lib/python*/site-packages/torch"))
    assert Path(gpuxent_file).parent == ROOT / "gpuxent"  # this checkout, installed editable
    assert dist_version == gpuxent.__version__  # the one version, read from gpuxent/__init__.py
    info = json.loads(_run([venv / "bin/gpuxent", "info", "--json"], tmp_path))
    assert info["torch"] == torch.__version__ and info["backends"]["numba_cpu"]["available"]


def test_wheel_carries_version_license_and_py_typed(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, "."], cwd=ROOT)
    (wheel,) = tmp_path.glob("gpuxent-*.whl")
    assert wheel.name.startswith(f"gpuxent-{gpuxent.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpuxent/py.typed" in names and "gpuxent/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "Classifier: Typing :: Typed" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if "triton" in r or "numba-cuda" in r]  # GPU stacks come with the extras
    assert any("numba-cuda[cu12]" in r and 'extra == "cuda12"' in r for r in requires)
    assert any("numba-cuda[cu13]" in r and 'extra == "cuda13"' in r for r in requires)
