"""Datasets for the tiny trainer: all bundled with a package, nothing is downloaded.

``load_dataset("digits" | "breast_cancer" | "and")`` or ``load_csv(path, target)`` give a
:class:`Dataset`: raw float32 features and int64 labels ``0..k-1``, already split into a train and a
stratified test part. Standardisation is the model's job (``gpuxent.mlp.MLP`` keeps the train split's
mean and std as buffers), so a checkpoint predicts on raw features.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "breast_cancer", "and")


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, package: str, purpose: str):
    """``import module``, or :class:`MissingDependency` saying that ``purpose`` needs ``package`` from
    the ``train`` extra (scikit-learn, pandas and matplotlib are not needed by the kernels)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(
            f"{purpose} needs {package}, which is not installed: pip install 'gpuxent[train]'"
        ) from None


@dataclass
class Dataset:
    """A classification data set, split. ``classes[k]`` is the original label of class index ``k``."""

    name: str
    X_train: np.ndarray  # (n_train, n_features) float32
    y_train: np.ndarray  # (n_train,) int64 in [0, n_classes)
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list
    feature_names: list[str]

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def binary(self) -> bool:
        """Two classes: one logit and BCE-with-logits; otherwise ``n_classes`` logits and softmax CE."""
        return self.n_classes == 2


def encode_labels(y) -> tuple[np.ndarray, list]:
    """Map labels (numbers or strings) to ``0..k-1`` in sorted order (for two classes the larger label
    becomes 1); ``classes[k]`` is the label of index ``k``, so predictions map back to labels.

    Raises:
        ValueError: fewer than two distinct labels, or labels that mix numbers and strings.
    """
    try:
        classes, codes = np.unique(np.asarray(y), return_inverse=True)
    except TypeError:  # labels that do not sort together: 1 and "a"
        kinds = sorted({type(v).__name__ for v in np.asarray(y, dtype=object).reshape(-1)})
        raise ValueError(f"target: labels of one kind expected (all numbers or all strings), got {kinds}") from None
    if len(classes) < 2:
        raise ValueError(f"target: needs at least two classes, found {len(classes)} ({classes.tolist()})")
    return codes.astype(np.int64).reshape(-1), classes.tolist()


def stratified_split(y: np.ndarray, test_size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: each class contributes ``round(test_size * n_c)`` rows to the test part,
    but always leaves at least one in train. Both index arrays are shuffled."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size: expected a number in (0, 1), got {test_size!r}")
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = min(int(round(test_size * len(idx))), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = np.concatenate(train), np.concatenate(test)
    if len(test) == 0:
        raise ValueError(f"test_size={test_size} leaves no test rows for {len(y)} rows; use more data")
    return rng.permutation(train), rng.permutation(test)


def make_dataset(name, X, y, *, test_size=0.2, seed=0, feature_names=None, same_split=False) -> Dataset:
    """Encode the labels, split (stratified, seeded) and wrap as a :class:`Dataset`.

    ``same_split=True`` trains and tests on all rows (the lecture's AND gate has only four).
    """
    X = np.asarray(X, dtype=np.float32)
    y, classes = encode_labels(y)
    if same_split:
        tr = te = np.arange(len(y))
    else:
        tr, te = stratified_split(y, test_size, np.random.default_rng(seed))
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(X.shape[1])]
    return Dataset(name, X[tr], y[tr], X[te], y[te], classes, names)


def and_gate() -> tuple[np.ndarray, np.ndarray]:
    """The lecture's AND example: inputs 00, 01, 10, 11 and ``y = x1 AND x2``."""
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    return X, np.array([0, 0, 0, 1], dtype=np.int64)


def load_dataset(name: str, *, test_size: float = 0.2, seed: int = 0) -> Dataset:
    """One of :data:`DATASETS`: scikit-learn's bundled ``digits`` (10 classes, 1797 rows of 8x8 pixels)
    and ``breast_cancer`` (binary, 569 rows, 30 features), or the lecture's ``and`` gate."""
    if name == "and":
        X, y = and_gate()
        return make_dataset("and", X, y, feature_names=["x1", "x2"], same_split=True)
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown dataset {name!r}; choose one of {DATASETS} or pass a CSV")
    datasets = require("sklearn.datasets", "scikit-learn", f"the {name} dataset")
    bunch = getattr(datasets, f"load_{name}")()
    names = [str(n) for n in getattr(bunch, "feature_names", [])] or None
    return make_dataset(name, bunch.data, bunch.target, test_size=test_size, seed=seed, feature_names=names)


def load_csv(path, target: str, *, test_size: float = 0.2, seed: int = 0) -> Dataset:
    """A user CSV with a header row: column ``target`` holds the labels (numbers or strings: classes
    are the sorted distinct labels, see :func:`encode_labels`), every other column must be a numeric
    feature without missing values, finite in float32.

    Raises:
        ValueError: ``path`` is not a file, the target column is missing, a feature is not numeric, has
            missing values or a value that is infinite in float32 (``inf``, ``1e39``), or the target
            has a missing (empty, NaN, blank) label or a single class.
    """
    pd = require("pandas", "pandas", "reading a CSV")
    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"csv: {path} {problem}; expected a CSV file")
    try:
        df = pd.read_csv(path)
    except ValueError as exc:  # pandas' EmptyDataError, ParserError, a decoding error
        raise ValueError(f"csv: cannot read {path}: {exc}") from None
    if target not in df.columns:
        raise ValueError(f"target: column {target!r} not found in {path}; columns are {list(df.columns)}")
    features = df.drop(columns=[target])
    if features.shape[1] == 0:
        raise ValueError(f"{path}: no feature columns besides the target {target!r}")
    non_numeric = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise ValueError(f"{path}: feature columns must be numeric; non-numeric: {non_numeric}")
    missing = [str(c) for c in features.columns if features[c].isna().any()]
    if missing:
        raise ValueError(f"{path}: feature columns with missing values: {missing}")
    labels = _labels(df[target], target, path)
    with np.errstate(over="ignore"):  # 1e39 becomes inf in float32: reported just below
        X = features.to_numpy(np.float32)
    infinite = [str(c) for c, ok in zip(features.columns, np.isfinite(X).all(axis=0)) if not ok]
    if infinite:
        raise ValueError(f"{path}: feature columns with values that are infinite in float32: {infinite}")
    return make_dataset(
        str(path),
        X,
        labels,
        test_size=test_size,
        seed=seed,
        feature_names=[str(c) for c in features.columns],
    )


def _labels(column, target: str, path) -> np.ndarray:
    """The label column as an array: strings without surrounding blanks (``"cat "`` is the class
    ``"cat"``). ValueError naming the rows whose label is missing (empty, ``NaN``, ``NA``, blank)."""
    labels = column.map(lambda v: v.strip() if isinstance(v, str) else v)
    missing = np.flatnonzero((labels.isna() | (labels == "")).to_numpy())
    if len(missing):
        rows = ", ".join(str(r + 2) for r in missing[:5]) + (", ..." if len(missing) > 5 else "")  # + header, from 1
        raise ValueError(f"{path}: target column {target!r} has missing labels (NaN, NA or empty) on lines {rows}")
    return labels.to_numpy()
