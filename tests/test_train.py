"""The tiny MLP trainer: accuracy on the bundled data sets, the AND gate, gpuxent's losses against
torch.nn.functional step by step, CSV input and its errors, checkpoints, the CLI, thread counts and data
parallelism (spawned with --nproc, and launched by torchrun)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpuxent import cli
from gpuxent.data import load_csv, load_dataset
from gpuxent.train import TrainConfig, load_checkpoint, run, train


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The default run (digits, 20 epochs), with a plot and a checkpoint, shared by several tests."""
    tmp = tmp_path_factory.mktemp("digits")
    cfg = TrainConfig(dataset="digits", plot=str(tmp / "curves.png"), checkpoint=str(tmp / "mlp.pt"), device="cpu")
    return run(cfg)


def test_digits_reaches_95_percent(digits_run):
    s = digits_run["summary"]
    assert s["task"] == "multiclass" and s["n_classes"] == 10 and s["epochs"] == 20
    assert s["test_accuracy"] >= 0.95, s
    losses = digits_run["history"]["loss"]
    assert losses[-1] < losses[0] / 10


def test_breast_cancer_reaches_95_percent():
    out = run(TrainConfig(dataset="breast_cancer", device="cpu"))
    s = out["summary"]
    assert s["task"] == "binary" and s["n_classes"] == 2
    assert s["test_accuracy"] >= 0.95, s


def test_and_gate_learnt_exactly():
    out = train(TrainConfig(dataset="and", device="cpu"))
    X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert out["model"].predict(X).tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize(
    "dataset, epochs, activation, entropy_bonus",
    [("digits", 1, "relu", 0.0), ("breast_cancer", 3, "tanh", 0.0), ("digits", 1, "tanh", 0.2)],  # >= 20 steps
)
def test_first_losses_match_torch(dataset, epochs, activation, entropy_bonus):
    """The same seed, model and batches: gpuxent's fused loss and torch's give the same trajectory, and
    the token accuracy and entropy that gpuxent's loss returns from its own pass (multiclass) equal
    torch's argmax and log-softmax; with an entropy bonus the entropy's gradient trains too."""
    data = load_dataset(dataset)
    cfg = dict(dataset=dataset, epochs=epochs, activation=activation, device="cpu", entropy_bonus=entropy_bonus)
    runs = {impl: train(TrainConfig(**cfg, loss_impl=impl), data) for impl in ("gpuxent", "torch")}
    ours, ref = (np.array(runs[impl]["history"]["step_losses"][:20]) for impl in ("gpuxent", "torch"))
    assert len(ours) == 20
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    for key in ("token_acc", "entropy"):
        got, want = runs["gpuxent"]["history"][key], runs["torch"]["history"][key]
        assert len(got) == epochs and all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=key)
    assert runs["torch"]["backend"] == "torch" and runs["gpuxent"]["backend"] == "numba_cpu"


def test_entropy_bonus_changes_training():
    """A negative bonus (a confidence penalty's opposite sign: rewards confident predictions) lowers the
    predictions' entropy against the plain run of the same seed; a positive one raises it."""
    data = load_dataset("digits")
    ent = {
        beta: train(TrainConfig(dataset="digits", epochs=2, device="cpu", entropy_bonus=beta), data)["history"][
            "entropy"
        ][-1]
        for beta in (-0.5, 0.0, 0.5)
    }
    assert ent[-0.5] < ent[0.0] < ent[0.5], ent


def test_split_is_stratified_and_seeded():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    counts_test = np.bincount(a.y_test, minlength=10) / len(a.y_test)
    counts_train = np.bincount(a.y_train, minlength=10) / len(a.y_train)
    np.testing.assert_allclose(counts_test, counts_train, atol=0.01)


def _breast_cancer_frame():
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    df = pd.DataFrame(bunch.data, columns=bunch.feature_names)
    df["diagnosis"] = np.array(bunch.target_names)[bunch.target]  # string labels: "benign" / "malignant"
    return df


def test_csv_round_trip(tmp_path):
    path = tmp_path / "cancer.csv"
    _breast_cancer_frame().to_csv(path, index=False)
    data = load_csv(path, "diagnosis")
    assert data.classes == ["benign", "malignant"] and data.binary and data.n_features == 30
    out = run(TrainConfig(csv=str(path), target="diagnosis", device="cpu"))
    assert out["summary"]["test_accuracy"] >= 0.93, out["summary"]


def test_csv_multiclass(tmp_path):
    import pandas as pd
    from sklearn.datasets import load_digits

    bunch = load_digits()
    df = pd.DataFrame(bunch.data[:600], columns=[f"p{i}" for i in range(64)])
    df["digit"] = bunch.target[:600] + 10  # labels 10..19 map to 0..9
    df.to_csv(tmp_path / "digits.csv", index=False)
    data = load_csv(tmp_path / "digits.csv", "digit")
    assert data.n_classes == 10 and data.classes == list(range(10, 20))
    assert set(np.unique(data.y_train)) == set(range(10))


def test_csv_string_labels_train_like_integer_labels(tmp_path):
    """String labels are classes: the sorted distinct labels, whatever blanks surround them ("class_1 " is
    "class_1"). The same CSV with integer labels in the same order trains the same model to the same
    accuracy, and the checkpoint's classes map the predictions back to the strings."""
    import pandas as pd
    from sklearn.datasets import load_wine

    bunch = load_wine()
    df = pd.DataFrame(bunch.data, columns=bunch.feature_names)
    df["label"] = bunch.target
    df.to_csv(tmp_path / "ints.csv", index=False)
    names = np.array([f"class_{k}" for k in bunch.target], dtype=object)
    names[::3] = [f" {n} " for n in names[::3]]  # a hand-edited file: blanks around some labels
    df["label"] = names
    df.to_csv(tmp_path / "strings.csv", index=False)
    runs = {}
    for kind in ("ints", "strings"):
        csv, checkpoint = str(tmp_path / f"{kind}.csv"), str(tmp_path / f"{kind}.pt")
        runs[kind] = run(TrainConfig(csv=csv, target="label", device="cpu", epochs=10, checkpoint=checkpoint))
    ints, strings = runs["ints"]["summary"], runs["strings"]["summary"]
    assert strings["n_classes"] == 3 and strings["test_accuracy"] >= 0.9, strings
    assert strings["test_accuracy"] == ints["test_accuracy"] and strings["history"] == ints["history"]
    model, ckpt = load_checkpoint(tmp_path / "strings.pt")
    assert ckpt["classes"] == ["class_0", "class_1", "class_2"]
    data = runs["strings"]["data"]
    predicted = np.array(ckpt["classes"])[model.predict(torch.from_numpy(data.X_test)).numpy()]
    truth = np.array(ckpt["classes"])[data.y_test]
    assert (predicted == truth).mean() == strings["test_accuracy"]


@pytest.mark.parametrize("hole", ["", "  ", "NA", "nan"])
def test_csv_missing_label_is_an_error(hole, tmp_path, capsys):
    df = _breast_cancer_frame()
    df["diagnosis"] = df["diagnosis"].astype(object)
    df.loc[[4, 9], "diagnosis"] = hole
    df.to_csv(tmp_path / "holes.csv", index=False)
    assert cli.main(["train", "--csv", str(tmp_path / "holes.csv"), "--target", "diagnosis"]) == 2
    err = capsys.readouterr().err
    assert "target column 'diagnosis' has missing labels (NaN, NA or empty) on lines 6, 11" in err, err
    assert err.count("\n") == 1


def test_bad_csvs(tmp_path):
    df = _breast_cancer_frame()
    good = tmp_path / "good.csv"
    df.to_csv(good, index=False)
    with pytest.raises(ValueError, match="column 'label' not found"):
        load_csv(good, "label")

    text = df.copy()
    text["mean radius"] = "r" + text["mean radius"].astype(str)
    text.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ValueError, match=r"non-numeric: \['mean radius'\]"):
        load_csv(tmp_path / "text.csv", "diagnosis")

    one = df[df["diagnosis"] == "benign"]
    one.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(ValueError, match="at least two classes"):
        load_csv(tmp_path / "one.csv", "diagnosis")

    holes = df.copy()
    holes.loc[3, "mean area"] = np.nan
    holes.to_csv(tmp_path / "holes.csv", index=False)
    with pytest.raises(ValueError, match="missing values"):
        load_csv(tmp_path / "holes.csv", "diagnosis")


def test_bad_csv_through_cli(tmp_path, capsys):
    _breast_cancer_frame().to_csv(tmp_path / "c.csv", index=False)
    assert cli.main(["train", "--csv", str(tmp_path / "c.csv"), "--target", "nope", "--json"]) == 2
    assert "column 'nope' not found" in capsys.readouterr().err


def test_checkpoint_round_trip(digits_run):
    s = digits_run["summary"]
    model, ckpt = load_checkpoint(s["checkpoint"])
    assert ckpt["train_config"]["dataset"] == "digits" and ckpt["classes"] == list(range(10))
    X = torch.from_numpy(digits_run["data"].X_test)  # raw features: the standardisation is in the model
    trained = digits_run["model"].cpu()
    torch.testing.assert_close(model(X), trained(X), rtol=0, atol=0)
    assert torch.equal(model.predict(X), trained.predict(X))
    with open(s["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_json(capsys):
    argv = ["train", "--dataset", "breast_cancer", "--epochs", "3", "--hidden", "16", "--activation", "gelu", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"dataset", "test_accuracy", "final_loss", "epochs", "backend"} <= set(out)
    assert out["dataset"] == "breast_cancer" and out["epochs"] == 3 and out["hidden"] == [16]
    assert out["backend"] in ("numba_cpu", "triton", "numba_cuda")
    assert 0.0 <= out["test_accuracy"] <= 1.0 and np.isfinite(out["final_loss"])


def test_run_restores_the_callers_thread_counts():
    """A run uses one CPU thread (TrainConfig.threads) and gives the caller's torch and numba counts back."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 CPU threads to tell 1 from the caller's count")
    saved = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(2)
        numba.set_num_threads(2)
        run(TrainConfig(dataset="and", epochs=2, device="cpu", threads=1))
        assert (torch.get_num_threads(), numba.get_num_threads()) == (2, 2)
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


@pytest.fixture(scope="module")
def nproc2_run():
    """`--nproc 2`: two gloo processes spawned here, meeting through a file rendezvous."""
    return run(TrainConfig(dataset="digits", nproc=2, device="cpu"))


def test_data_parallel_matches_one_process(digits_run, nproc2_run):
    """Two gloo processes, each with half of every mini-batch: the same trajectory up to rounding."""
    out = nproc2_run
    one, two = digits_run["summary"], out["summary"]
    assert two["nproc"] == 2 and two["test_accuracy"] >= 0.95
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.02
    np.testing.assert_allclose(out["history"]["loss"][:5], digits_run["history"]["loss"][:5], rtol=1e-3)


def test_torchrun_matches_nproc(nproc2_run, tmp_path):
    """`python -m torch.distributed.run --nproc-per-node 2 -m gpuxent train`: env:// rendezvous, rank 0
    alone prints (one JSON object) and writes the plot; the same run as `--nproc 2` with the same seed."""
    plot = tmp_path / "curves.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "gpuxent", "train", "--dataset", "digits", "--device", "cpu", "--json", "--plot", str(plot)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = json.loads(proc.stdout)  # one object: the other rank printed nothing
    spawned = nproc2_run["summary"]
    assert launched["nproc"] == spawned["nproc"] == 2
    assert launched["test_accuracy"] == spawned["test_accuracy"]
    np.testing.assert_allclose(launched["history"]["loss"], spawned["history"]["loss"], rtol=1e-6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stderr.count("epoch 20:") == 1  # rank 0's log only


def test_launch_from_env():
    from gpuxent.train import Launch

    assert Launch.from_env({}) is None
    assert Launch.from_env({"RANK": "1", "WORLD_SIZE": "2"}) is None  # no rendezvous address: not launched
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert Launch.from_env(env) == Launch(rank=5, world_size=8, local_rank=1, local_world_size=4)


def test_nproc_under_a_launcher_is_an_error(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="nproc: the 2 processes come from the launcher"):
        run(TrainConfig(dataset="and", nproc=2))


# --------------------------------------------------------------------------- distillation


def test_distilled_half_width_student_matches_teacher(digits_run, capsys):
    """`gpuxent train --distill-from`: a 32,32 student taught by the default 64,64 MLP on digits reaches the
    teacher's test accuracy within 1 point."""
    teacher = digits_run["summary"]
    argv = ["train", "--dataset", "digits", "--hidden", "32,32", "--distill-from", teacher["checkpoint"]]
    assert cli.main([*argv, "--temperature", "4", "--alpha", "0.5", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["hidden"] == [32, 32] and s["distill_from"] == teacher["checkpoint"]
    assert s["temperature"] == 4.0 and s["alpha"] == 0.5
    assert s["teacher_test_accuracy"] == pytest.approx(teacher["test_accuracy"])
    assert s["test_accuracy"] >= teacher["test_accuracy"] - 0.01, s


@pytest.mark.parametrize("dataset", ["digits", "breast_cancer"])
def test_distillation_losses_match_torch(dataset, tmp_path):
    """The same seed, student, teacher and batches: the fused distillation loss and torch's composition
    (log_softmax + F.kl_div) give the same trajectory (binary tasks as two-class logits [0, z])."""
    data = load_dataset(dataset)
    ckpt = str(tmp_path / "teacher.pt")
    run(TrainConfig(dataset=dataset, epochs=1, device="cpu", checkpoint=ckpt))
    cfg = dict(dataset=dataset, epochs=2, hidden=(16,), device="cpu", distill_from=ckpt, temperature=3.0, alpha=0.3)
    runs = {impl: train(TrainConfig(**cfg, loss_impl=impl), data) for impl in ("gpuxent", "torch")}
    ours, ref = (np.array(runs[impl]["history"]["step_losses"][:10]) for impl in ("gpuxent", "torch"))
    assert len(ours) == 10
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_distillation_arguments_are_checked(digits_run, tmp_path, capsys):
    for argv, needle in [
        (["--distill-from", str(tmp_path / "none.pt")], "--distill-from"),
        (["--distill-from", __file__], "--distill-from"),
        (["--distill-from", digits_run["summary"]["checkpoint"], "--temperature", "0"], "temperature: expected"),
        (["--distill-from", digits_run["summary"]["checkpoint"], "--alpha", "1.5"], "alpha: expected"),
        (["--dataset", "breast_cancer", "--distill-from", digits_run["summary"]["checkpoint"]], "--distill-from"),
    ]:
        assert cli.main(["train", "--epochs", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_teacher_of_other_data_is_refused(tmp_path, capsys):
    """A teacher of the same shape trained on other data (other feature names, other class labels) is an
    error naming what differs, exit 2; the same data written to a CSV (same names, same labels) is fine."""
    teacher = str(tmp_path / "teacher.pt")
    assert cli.main(["train", "--dataset", "breast_cancer", "--epochs", "1", "--checkpoint", teacher]) == 0
    capsys.readouterr()
    same = _breast_cancer_frame()
    same["diagnosis"] = (same["diagnosis"] == "benign").astype(int)  # breast_cancer's own labels (0: malignant)
    renamed = same.rename(columns={c: f"x{i}" for i, c in enumerate(same.columns[:-1])})
    relabelled = _breast_cancer_frame()  # "benign" / "malignant" where the teacher has 0 / 1
    for name, frame, needle in [
        ("renamed", renamed, "feature names differ: at position 0: 'mean radius' in the teacher, 'x0' in the data"),
        ("relabelled", relabelled, "classes differ: at position 0: 0 in the teacher, 'benign' in the data"),
    ]:
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        argv = ["train", "--csv", str(tmp_path / f"{name}.csv"), "--target", "diagnosis", "--epochs", "1"]
        assert cli.main([*argv, "--distill-from", teacher]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    same.to_csv(tmp_path / "same.csv", index=False)
    argv = ["train", "--csv", str(tmp_path / "same.csv"), "--target", "diagnosis", "--epochs", "1"]
    assert cli.main([*argv, "--distill-from", teacher, "--json"]) == 0
