"""Packaging: the README's install command, run in a fresh virtual environment that already holds torch,
keeps that torch (a CUDA build stays a CUDA build) and gives a working `gpuxent`; the wheel carries the
version from gpuxent/__init__.py, the LICENSE and py.typed.

The fresh environment sees the packages of the interpreter that runs the tests, whether that is a
system interpreter or a virtualenv (where they live in the venv, not in its base interpreter). That the
README's command keeps torch is shown offline, by pip's resolver with no index. The install itself runs
offline too when this interpreter has the build backend (setuptools>=77, which torch 2.13 requires);
otherwise only the backend comes from the package index. The wheel test builds in pip's isolated
environment, which takes the backend from the index."""

import json
import os
import re
import site
import subprocess
import sys
import sysconfig
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


def _run(argv, cwd: Path, timeout=300, env=CLEAN_ENV) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def site_dirs() -> list[str]:
    """The site directories of this interpreter, in its order: inside a virtualenv its own site-packages
    (and the base's with --system-site-packages), else the interpreter's; the user site when enabled."""
    dirs = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    dirs += [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def venv_seeing_this_interpreter(venv: Path) -> Path:
    """A fresh virtual environment that sees what this interpreter sees (torch above all), as a user's
    `python -m venv --system-site-packages` sees the interpreter it was made from.

    `--system-site-packages` is not that when the tests run in a virtualenv: venv builds on the base
    interpreter, whose site-packages lack the venv's torch. So: build on the base interpreter (what venv
    does anyway) and add this interpreter's site directories, in its order, with a .pth file
    (`site.addsitedir`, so their own .pth files count too); nothing else (no base or user site that
    this interpreter does not see, and no pip or setuptools of ensurepip's that would shadow this
    interpreter's: `python -m pip` is this interpreter's pip, installing into the venv). Returns the
    venv's python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], venv).strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in site_dirs()]
    (Path(purelib) / "_test_interpreter_site.pth").write_text("\n".join(lines) + "\n")
    return python


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's own copy of tomli
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def readme_requirements(command: str) -> list[str]:
    """gpuxent's requirements with the extras of the README's `pip install -e ".[extras]"`, read from
    pyproject.toml (an extra naming `gpuxent[...]` brings those extras)."""
    project = pyproject()["project"]
    requirements, seen = list(project["dependencies"]), set()
    todo = re.search(r"\.\[([a-z0-9,]+)\]", command)[1].split(",")
    while todo:
        extra = todo.pop()
        if extra not in seen:
            seen.add(extra)
            for requirement in project["optional-dependencies"][extra]:
                if inner := re.fullmatch(r"gpuxent\[([a-z0-9,]+)\]", requirement):
                    todo += inner[1].split(",")
                else:
                    requirements.append(requirement)
    return requirements


# pip with no package index and no find-links: only what is installed can satisfy a requirement
OFFLINE_ENV = {k: v for k, v in CLEAN_ENV.items() if k != "PIP_FIND_LINKS"} | {"PIP_NO_INDEX": "1"}


def check_readme_command(command: str) -> None:
    # a torch already there is kept; only a machine without one gets the pinned CPU build first
    guard = r'python -c "import torch" 2>/dev/null \|\| python -m pip install torch==[0-9.]+; '
    assert re.fullmatch(f"({guard})?" + r'python -m pip install -e "\.\[[a-z0-9,]+\]"', command), command


def test_readme_command_keeps_the_installed_torch_offline(tmp_path):
    """No network: in a fresh venv that sees this interpreter's torch, the README's guard installs nothing
    and pip, with no index and no find-links, finds every requirement of the command (torch among them)
    already satisfied: it would install none of them. (`--no-deps`: their own requirements are not the
    question; in a venv made with ensurepip's old setuptools, torch's `setuptools>=77` would come from
    the index.)"""
    command = readme_install_command()
    check_readme_command(command)
    venv = tmp_path / "venv"
    python = venv_seeing_this_interpreter(venv)
    assert _run([python, "-c", "import torch; print(torch.__file__)"], tmp_path).strip() == torch.__file__
    guard = command.rpartition(";")[0] or "true"
    _run(["bash", "-c", f". {venv}/bin/activate && {guard}"], cwd=ROOT, env=OFFLINE_ENV)  # pip would fail
    requirements = readme_requirements(command)
    assert any(re.match(r"torch\b", r) for r in requirements), requirements
    report = tmp_path / "report.json"
    argv = [python, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", "--report", report, *requirements]
    _run(argv, cwd=tmp_path, env=OFFLINE_ENV)
    assert json.loads(report.read_text())["install"] == []
    assert not list(venv.glob("lib/python*/site-packages/torch"))


def test_readme_install_keeps_the_installed_torch(tmp_path):
    """The README's command, as a user types it, in a fresh venv that sees this interpreter's torch: the
    same torch afterwards, and this checkout installed editable. pip runs with no index (and no build
    isolation: the build backend is the venv's); when this interpreter lacks the backend
    (setuptools>=77), it alone is installed into the venv from the package index first."""
    command = readme_install_command()
    check_readme_command(command)
    venv = tmp_path / "venv"
    python = venv_seeing_this_interpreter(venv)
    assert _run([python, "-c", "import torch; print(torch.__file__)"], tmp_path).strip() == torch.__file__
    backend = pyproject()["build-system"]["requires"]
    check = [python, "-m", "pip", "install", "--dry-run", "--quiet", *backend]
    if subprocess.run(check, env=OFFLINE_ENV, capture_output=True, timeout=300).returncode != 0:
        _run([python, "-m", "pip", "install", "--quiet", *backend], cwd=tmp_path)  # needs the index
    _run(["bash", "-c", f". {venv}/bin/activate && {command} --no-build-isolation"], cwd=ROOT, env=OFFLINE_ENV)

    probe = (
        "import importlib.metadata as md, json, torch, gpuxent; "
        "print(json.dumps([torch.__version__, torch.__file__, gpuxent.__file__, md.version('gpuxent')]))"
    )
    version, torch_file, gpuxent_file, dist_version = json.loads(_run([python, "-c", probe], tmp_path))
    assert (version, torch_file) == (torch.__version__, torch.__file__)  # the same torch, not a new one
    assert not list(venv.glob("lib/python*/site-packages/torch"))
    assert list(venv.glob("lib/python*/site-packages/gpuxent-*.dist-info"))  # installed into the venv
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
