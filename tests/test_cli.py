"""The console script: `gpuxent info`, `gpuxent bench`, its one-line errors and strict JSON (`gpuxent train`'s
runs are in test_train.py); its habits: --version, help for every option, errors that name the flag and
suggest the closest one, a quiet end when the reader of its output goes away. No test here depends on how
fast anything runs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpuxent import bench, cli


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "gpuxent", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _strict_json(text):
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(name):
        raise AssertionError(f"{name} in the JSON output")

    return json.loads(text, parse_constant=refuse)


def _one_line_error(argv, capsys) -> str:
    """Run ``gpuxent argv`` in this process: it must exit 2 with one line on stderr (an uncaught
    exception, the traceback case, fails the test by itself)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1 and "error:" in err, err
    return err


def test_info_lists_every_backend_with_a_reason():
    info = _strict_json(_run("info", "--json"))  # python -m gpuxent: gpuxent/__main__.py
    assert {"gpuxent", "torch", "cuda", "numba", "device", "backends"} <= set(info)
    assert {"numba_cpu", "triton", "numba_cuda"} <= set(info["backends"])
    assert info["backends"]["numba_cpu"]["available"] is True
    assert all(row["why"] for row in info["backends"].values())
    text = _run("info")
    assert "numba_cpu" in text and "backends:" in text


def test_bench_json_rows():
    """The rows' shape and their arithmetic, which hold whatever the timings are."""
    result = _strict_json(_run("bench", "--json", "--sizes", "64x300", "--repeats", "1", "--no-compile"))
    assert result["machine"] and result["date"] and result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    rows = result["rows"]
    assert {(r["impl"].split(" ")[0], r["pass"]) for r in rows} == {
        ("gpuxent", "fwd"),
        ("gpuxent", "fwd+bwd"),
        ("torch", "fwd"),
        ("torch", "fwd+bwd"),
    }
    for r in rows:
        assert (r["n_rows"], r["n_classes"], r["dtype"]) == (64, 300, "float32")
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in ("median_ms", "gbps", "pct_copy"))
        nbytes = 64 * 300 * 4 * (1 if r["pass"] == "fwd" else 2)
        np.testing.assert_allclose(r["gbps"], nbytes / r["median_ms"] / 1e6, rtol=2e-3)
        np.testing.assert_allclose(r["pct_copy"], 100 * r["gbps"] / result["copy_gbps"], rtol=3e-3)
        if r["impl"] == "torch eager":
            assert r["speedup_vs_eager"] == 1.0


def test_bench_bookkeeping(monkeypatch):
    """With a timer that answers known times, every derived number is exact: GB/s from the byte model,
    % of copy, and both speed-ups, to 4 significant digits."""
    ms = {"gpuxent (numba_cpu)": 2.0, "torch eager": 8.0, "torch.compile": 5.0}
    copy_gbps = 40.0

    def fake_implementations(device, compile_):
        # each function returns its implementation's name, which the fake timer looks up
        return {name: (lambda x, t, name=name: name, lambda x, t, name=name: name) for name in ms}

    monkeypatch.setattr(bench, "_implementations", fake_implementations)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: copy_gbps)
    monkeypatch.setattr(bench, "time_ms", lambda fn, repeats: ms[fn()])
    result = bench.run([(1000, 500)], repeats=3, device=torch.device("cpu"), progress=False)
    assert result["copy_gbps"] == copy_gbps and len(result["rows"]) == 6
    for r in result["rows"]:
        nbytes = 1000 * 500 * 4 * (1 if r["pass"] == "fwd" else 2)
        gbps = nbytes / ms[r["impl"]] / 1e6
        assert r["median_ms"] == ms[r["impl"]]
        assert r["gbps"] == bench._sig(gbps) and r["pct_copy"] == bench._sig(100 * gbps / copy_gbps)
        assert r["speedup_vs_eager"] == bench._sig(ms["torch eager"] / ms[r["impl"]])
        assert r["speedup_vs_compile"] == bench._sig(ms["torch.compile"] / ms[r["impl"]])


def test_significant_digits_never_round_to_zero():
    assert bench._sig(0.000123456) == 0.0001235 and bench._sig(0.04) == 0.04 and bench._sig(98765.4) == 98770.0


@pytest.mark.parametrize("free_gib", [24, 40, 80, 141])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sizes_fit_free_memory(free_gib, dtype):
    """The default GPU sizes, shrunk to a card's free memory: every one fits, and shrinking only halves
    the row count (the vocabularies stay)."""
    free = free_gib * 2**30
    for defaults in (bench.GPU_SIZES, bench.GPU_SIZES_QUICK):
        sizes = bench.fit_sizes(defaults, dtype, free)
        assert [r for _, r in sizes] == [r for _, r in defaults]
        for (n, r), (n0, _) in zip(sizes, defaults):
            assert bench.memory_needed(n, r, dtype) <= bench.MEMORY_FRACTION * free
            assert n0 % n == 0 and (n == n0 or bench.memory_needed(2 * n, r, dtype) > bench.MEMORY_FRACTION * free)
        bench.check_sizes(sizes, dtype, 1, free)  # what run() checks before it allocates


def test_bench_peak_memory_within_its_model(tmp_path):
    """One size, every implementation, forward and forward+backward: the process's peak resident memory
    grows by at most PEAK_LOGIT_COPIES copies of the logits (the model that sizes the GPU problems;
    the same ATen kernels allocate the same tensors on CPU)."""
    script = tmp_path / "peak.py"
    script.write_text(
        "import resource, torch\n"
        "from tqdm import tqdm\n"
        "from gpuxent import bench\n"
        "impls = bench._implementations(torch.device('cpu'), compile_=False)\n"
        "bench._measure_size(64, 256, torch.float32, torch.device('cpu'), impls, 1, 1.0, tqdm(disable=True))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "bench._measure_size(1024, 32768, torch.float32, torch.device('cpu'), impls, 1, 1.0, tqdm(disable=True))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print((after - before) / (1024 * 32768 * 4))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    copies = float(proc.stdout.split()[-1])
    assert copies <= bench.PEAK_LOGIT_COPIES, copies


# --------------------------------------------------------------------------- errors: one line, exit 2


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bench", "--repeats", "0"], "repeats"),
        (["bench", "--sizes", "4x0"], "sizes"),
        (["bench", "--sizes", "4x"], "sizes"),
        (["bench", "--sizes", "64x300x2"], "sizes"),
        (["bench", "--sizes", f"{2**40}x{2**20}"], "GiB"),
        (["bench", "--bogus"], "unrecognized"),
        (["train", "--nproc", "0"], "nproc"),
        (["train", "--nproc", "2", "--batch-size", "0"], "--batch-size: expected >= 2"),
        (["train", "--epochs", "-1"], "--epochs: expected >= 0"),
        (["train", "--hidden", "64,x"], "--hidden: expected comma-separated"),
        (["train", "--lr", "nan"], "--lr: expected a finite number"),
        (["train", "--device", "gpu"], "--device: "),
        (["train", "--csv", "no-such.csv", "--target", "y"], "does not exist"),
        (["train", "--csv", "x.csv"], "--target: --csv needs --target COLUMN"),
        (["train", "--distill-from", "no-such.pt"], "--distill-from: no checkpoint file"),
        (["train", "--alpha", "0.3"], "error: --alpha sets the distillation and needs --distill-from"),
        (["train", "--alpha", "0.5"], "needs --distill-from"),  # the default value, given: still an error
        (["train", "--temperature", "2"], "error: --temperature sets the distillation and needs --distill-from"),
        (["bench", "--repeats", "0"], "--repeats: expected >= 1"),
        (["nope"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, needle, capsys, monkeypatch):
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "spawn", lambda *a, **k: pytest.fail("spawned before validating"))
    err = _one_line_error(argv, capsys)
    assert needle in err
    # a setting is named as the flag a user types, never as the library's field name
    assert not any(f" {name}:" in err for name in ("batch_size", "distill_from", "entropy_bonus")), err


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["train", "--batchsize", "8"], "(did you mean '--batch-size'?)"),
        (["train", "--optimiser=sgd"], "(did you mean '--optimizer'?)"),
        (["train", "--dataset", "digit"], "(did you mean 'digits'?)"),
        (["train", "--dataset", "breast-cancer"], "(did you mean 'breast_cancer'?)"),
        (["train", "--activation", "rleu"], "(did you mean 'relu'?)"),
        (["bench", "--dtype", "bfloat"], "(did you mean 'bfloat16'?)"),
        (["trian"], "(did you mean 'train'?)"),
    ],
)
def test_misspelt_flag_or_choice_suggests_the_closest(argv, suggestion, capsys):
    assert suggestion in _one_line_error(argv, capsys)


def test_nothing_close_suggests_nothing(capsys):
    assert "did you mean" not in _one_line_error(["train", "--zzzzzz"], capsys)


def test_version(capsys):
    import gpuxent

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpuxent {gpuxent.__version__}"


def test_every_option_has_help():
    parser = cli.build_parser()
    for name, command in parser.commands.items():
        for action in command._actions:
            if action.option_strings:
                assert action.help and action.help.strip(), (name, action.option_strings)
    train_help = parser.commands["train"].format_help()
    for words in ("activation of the hidden layers", "torch optimizer", "seed of the split"):
        assert words in " ".join(train_help.split())
    assert "dtype of the logits" in " ".join(parser.commands["bench"].format_help().split())


# --------------------------------------------------------------------------- a reader that goes away


def _without_compile_notices(err: str) -> str:
    """stderr less the one-line notices of a first compile (an empty numba cache: a fresh clone)."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("gpuxent: compiling "))


@pytest.mark.parametrize("argv", [["info"], ["train", "--dataset", "and", "--epochs", "3"]])
def test_closed_stdout_ends_quietly(argv):
    """The reader of stdout has gone before the first write (the case of `| head -1` once head has
    exited): no `[Errno 32] Broken pipe`, no "Exception ignored" at exit, status 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuxent", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert _without_compile_notices(err) == ""


def test_piped_to_head():
    """`gpuxent train ... | head -1`, as a user types it (under pipefail: gpuxent's own status counts)."""
    command = f"set -o pipefail; {sys.executable} -m gpuxent train --dataset and --epochs 20 | head -1"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("epoch 1:") and proc.stdout.count("\n") == 1, proc.stdout
    assert _without_compile_notices(proc.stderr) == ""


# --------------------------------------------------------------------------- train's text output and plot


def test_text_output_has_the_teachers_accuracy(tmp_path, capsys):
    teacher = str(tmp_path / "teacher.pt")
    assert cli.main(["train", "--dataset", "and", "--epochs", "5", "--checkpoint", teacher]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--dataset", "and", "--epochs", "5", "--distill-from", teacher]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"teacher {teacher}: test_acc ") for line in lines), lines
    assert cli.main(["train", "--dataset", "and", "--epochs", "5"]) == 0
    assert "teacher" not in capsys.readouterr().out


def test_plot_shows_train_and_test_where_they_overlap(tmp_path):
    """On AND the train and test accuracy are the same curve: they are drawn in different styles, the
    one below wider, so both show."""
    from gpuxent.train import plot_history

    acc = [0.75, 1.0, 1.0, 1.0]
    history = dict(epoch=[1, 2, 3, 4], loss=[0.7, 0.5, 0.3, 0.2], token_acc=acc, entropy=[0.6, 0.5, 0.4, 0.3])
    fig = plot_history(dict(history, train_acc=acc, test_acc=acc), tmp_path / "and.png")
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    train, test = lines["train"], lines["test"]
    assert train.get_linestyle() != test.get_linestyle() and train.get_marker() != test.get_marker()
    assert train.get_linewidth() > test.get_linewidth()
    assert (tmp_path / "and.png").stat().st_size > 0


def test_csv_directory_is_an_error(tmp_path, capsys):
    err = _one_line_error(["train", "--csv", str(tmp_path), "--target", "y"], capsys)
    assert "is a directory" in err


@pytest.mark.parametrize("cell", ["inf", "-inf", "1e39"])
def test_csv_infinite_in_float32_is_an_error(cell, tmp_path, capsys):
    rows = [f"{i},{i % 3},{i % 2}" for i in range(20)]
    rows[7] = f"7,{cell},1"
    path = tmp_path / "data.csv"
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    err = _one_line_error(["train", "--csv", str(path), "--target", "y"], capsys)
    assert "infinite in float32: ['b']" in err


@pytest.fixture
def no_training(monkeypatch):
    """Training fails the test: what is checked must be checked before it."""
    from gpuxent import train

    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained before checking the outputs"))


@pytest.mark.parametrize("flag", ["--plot", "--checkpoint"])
@pytest.mark.parametrize("where", ["missing-dir/out.png", "/proc/out.png", "."])
def test_unwritable_output_fails_before_training(flag, where, tmp_path, capsys, no_training):
    path = where if where.startswith("/") else str(tmp_path / where)
    err = _one_line_error(["train", "--dataset", "and", flag, path], capsys)
    assert flag.lstrip("-") + ":" in err


def test_plot_format_checked_before_training(tmp_path, capsys, no_training):
    assert "cannot save a .xyz file" in _one_line_error(["train", "--plot", str(tmp_path / "a.xyz")], capsys)


@pytest.mark.parametrize(
    "module, argv",
    [
        ("sklearn", ["train", "--dataset", "digits"]),
        ("pandas", ["train", "--csv", __file__, "--target", "y"]),
        ("matplotlib", ["train", "--dataset", "and", "--plot", "curves.png"]),
    ],
)
def test_missing_optional_dependency_names_the_extra(module, argv, capsys, monkeypatch, no_training):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # "import module" now raises ImportError
    err = _one_line_error(argv, capsys)
    assert "pip install 'gpuxent[train]'" in err


# --------------------------------------------------------------------------- strict JSON


def test_train_json_has_no_bare_nan(capsys):
    """Zero epochs: no loss nor accuracy to report, written as null (NaN is not JSON)."""
    assert cli.main(["train", "--dataset", "and", "--epochs", "0", "--json"]) == 0
    out = _strict_json(capsys.readouterr().out)
    assert out["final_loss"] is None and out["test_accuracy"] is None and out["epochs"] == 0


def test_finite_json():
    obj = {"a": [1.0, math.nan, {"b": -math.inf}], "c": (math.inf, 2), "d": "nan", "e": 3}
    assert json.loads(json.dumps(cli.finite_json(obj), allow_nan=False)) == {
        "a": [1.0, None, {"b": None}],
        "c": [None, 2],
        "d": "nan",
        "e": 3,
    }


def test_warmup_compiles_and_says_so(capsys):
    assert cli.main(["warmup", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "float64: ready in" in out and "warm:" in out


def test_a_long_first_call_prints_one_notice(monkeypatch, capsys):
    """A first call that takes over COMPILE_NOTICE_S (numba compiling) prints one line on stderr naming
    what compiles, that it happens once and where the cache is; the same call again prints nothing."""
    import time

    from gpuxent.backends.numba_cpu import runtime

    def slow_kernel(*args):  # stands in for a compiling kernel
        time.sleep(0.3)

    monkeypatch.setattr(runtime, "_SEEN", set())
    monkeypatch.setattr(runtime, "COMPILE_NOTICE_S", 0.05)
    arr = np.zeros(3, np.float32)
    runtime.launch(slow_kernel, 3, 1, arr)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the numba_cpu slow_kernel for float32" in err
    assert "once" in err and "cached in" in err and "gpuxent warmup" in err
    runtime.launch(slow_kernel, 3, 1, arr)
    time.sleep(0.1)
    assert capsys.readouterr().err == ""
