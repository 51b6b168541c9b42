"""The README as a newcomer uses it: its python blocks run as pasted in a fresh process, its links lead
somewhere, and neither it nor docs/ names a path outside the repository or an internal ticket. Also
the torch habits it promises: `dim=` for softmax and log_softmax."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpuxent as gx

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the user's environment: none of the test session's switches (the CPU interpreters of the GPU backends)
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_as_pasted(code: str, tmp_path: Path) -> str:
    """``code`` in a fresh interpreter, from an empty directory (nothing of the checkout on its path
    but the installed gpuxent)."""
    script = tmp_path / "pasted.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{code}\n--- stderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_quickstart_runs_as_pasted(tmp_path):
    quickstart = python_blocks(README)[0]
    assert 8 <= len(quickstart.strip().splitlines()) <= 16, "the quickstart is about 10 lines"
    assert "F.cross_entropy" in quickstart and "np." in quickstart and "backward()" in quickstart
    out = run_as_pasted(quickstart, tmp_path).splitlines()
    assert out[-1] == "True", out  # the line against F.cross_entropy
    assert out[0].endswith("(8, 5)"), out


def test_llm_example_runs_as_pasted(tmp_path):
    (block,) = [b for b in python_blocks(README) if "gx.linear_cross_entropy(" in b]
    assert run_as_pasted(block, tmp_path).splitlines()[-1] == "True"


def test_hugging_face_example_runs_as_pasted(tmp_path):
    pytest.importorskip("transformers")
    (block,) = [b for b in python_blocks(README) if "apply_gpuxent" in b]
    run_as_pasted(block + "\nassert out.logits is None and out.loss.isfinite()\n", tmp_path)


def test_every_python_block_is_tested():
    blocks = python_blocks(README)
    tested = [blocks[0]] + [b for b in blocks if "gx.linear_cross_entropy(" in b or "apply_gpuxent" in b]
    assert len(blocks) == len(set(tested)), "a README python block that no test runs"


def test_the_two_commands_come_first():
    """The first two shell blocks: install and run the main job, then the tests (tests/test_install.py
    checks that the first keeps an installed torch)."""
    shell = re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M)
    assert shell[0].strip().endswith("gpuxent bench") and "pip install -e" in shell[0]
    assert shell[1].strip() == 'python -m pip install -e ".[dev]" && python -m pytest -q -n auto --dist loadfile tests'


def test_extras_named_in_the_readme_exist():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's own copy of tomli
        from pip._vendor import tomli as tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for group in re.findall(r'-e "\.\[([a-z0-9,]+)\]"', README):
        assert set(group.split(",")) <= extras, group


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_links_lead_somewhere(doc):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_no_outside_path_nor_ticket_number(doc):
    text = doc.read_text()
    assert not re.search(r"shared/|\.\./shared|\bissues? #?\d+|#\d{1,4}\b", text, flags=re.I), doc.name


def test_readme_is_short():
    assert len(README.encode()) < 10_000


def test_benchmark_picture_is_a_png():
    assert (ROOT / "docs" / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(docs/benchmark.png)" in README


# --------------------------------------------------------------------------- dim, as torch users type it


@pytest.mark.parametrize("fn, ref", [(gx.softmax, torch.softmax), (gx.log_softmax, torch.log_softmax)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_dim_is_axis(fn, ref, dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(fn(x, dim=dim), ref(x, dim))
    torch.testing.assert_close(fn(x, dim=dim), fn(x, axis=dim), rtol=0, atol=0)
    torch.testing.assert_close(fn(x, dim), ref(x, dim))  # positional, as F.softmax(x, dim)
    torch.testing.assert_close(fn(x), ref(x, -1))  # the default: the last axis
    a = x.numpy()
    np.testing.assert_allclose(fn(a, dim=dim), ref(x, dim).numpy())


@pytest.mark.parametrize("fn", [gx.softmax, gx.log_softmax])
def test_softmax_dim_and_axis_together_is_an_error(fn):
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="both axis and dim"):
        fn(x, axis=0, dim=0)
    with pytest.raises(TypeError, match="both axis and dim"):
        fn(x, 1, dim=1)
    with pytest.raises(ValueError, match="^dim: "):
        fn(x, dim=2)
