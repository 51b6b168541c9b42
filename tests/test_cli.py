"""The console script: `gpuxent info` and `gpuxent bench` (`gpuxent train` is in test_train.py)."""

import json
import subprocess
import sys


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "gpuxent.cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_info_lists_every_backend_with_a_reason():
    info = json.loads(_run("info", "--json"))
    assert {"gpuxent", "torch", "numba", "device", "backends"} <= set(info)
    assert set(info["backends"]) == {"numba_cpu", "triton", "numba_cuda"}
    assert info["backends"]["numba_cpu"]["available"] is True
    assert all(row["why"] for row in info["backends"].values())
    text = _run("info")
    assert "numba_cpu" in text and "backends:" in text


def test_bench_json_rows():
    result = json.loads(_run("bench", "--json", "--sizes", "64x300", "--repeats", "1", "--no-compile"))
    assert result["copy_gbps"] > 0 and result["machine"] and result["date"]
    rows = result["rows"]
    assert {(r["impl"].split(" ")[0], r["pass"]) for r in rows} == {
        ("gpuxent", "fwd"),
        ("gpuxent", "fwd+bwd"),
        ("torch", "fwd"),
        ("torch", "fwd+bwd"),
    }
    for r in rows:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0 and r["speedup_vs_eager"] > 0
        assert (r["n_rows"], r["n_classes"], r["dtype"]) == (64, 300, "float32")
