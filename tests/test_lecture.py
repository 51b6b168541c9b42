"""The lecture (shared/seed) as tests: maximum likelihood, softmax, the AND gate, categorical CE."""

import numpy as np
import torch
import torch.nn.functional as F

import gpuxent as gx


def test_and_gate_softmax_and_predictions(backend):
    X = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float64)  # inputs with a bias column
    W = np.array([[-1, 1], [-1, 1], [2, -1]], dtype=np.float64)
    Z = X @ W
    np.testing.assert_array_equal(Z, [[2, -1], [1, 0], [1, 0], [0, 1]])
    P = gx.softmax(backend.tensor(Z), backend=backend.name).cpu().numpy()
    np.testing.assert_allclose(P, torch.softmax(torch.from_numpy(Z), -1).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(P.round(2), [[0.95, 0.05], [0.73, 0.27], [0.73, 0.27], [0.27, 0.73]])
    np.testing.assert_array_equal(gx.predict(P), [0, 0, 0, 1])  # Y-hat = the AND gate
    Y = np.eye(2)[[0, 0, 0, 1]]  # one-hot targets
    loss = gx.cross_entropy(backend.tensor(Z), backend.tensor(Y), reduction="none", backend=backend.name)
    np.testing.assert_allclose(loss.cpu().numpy(), -np.log(P[np.arange(4), [0, 0, 0, 1]]), rtol=1e-12)


def test_sum_of_bce_is_negative_log_likelihood(backend, rng):
    n = 50
    p = rng.uniform(0.01, 0.99, n)
    y = rng.integers(0, 2, n).astype(np.float64)
    likelihood = np.prod(np.where(y == 1, p, 1 - p))  # V_T = prod over (x, y) of Pr[y | x]
    total = gx.binary_cross_entropy(backend.tensor(p), backend.tensor(y), reduction="sum", backend=backend.name)
    np.testing.assert_allclose(total.item(), -np.log(likelihood), rtol=1e-10)
    np.testing.assert_allclose(
        total.item(), F.binary_cross_entropy(torch.from_numpy(p), torch.from_numpy(y), reduction="sum")
    )
    assert gx.predict_binary(p).tolist() == (p >= 0.5).astype(int).tolist()


def test_categorical_ce_of_one_hot_is_minus_log_p(backend, rng):
    z = rng.standard_normal((6, 4))
    c = rng.integers(0, 4, 6)
    p = torch.softmax(torch.from_numpy(z), -1).numpy()
    np.testing.assert_allclose(gx.softmax(backend.tensor(z), backend=backend.name).sum(-1).cpu().numpy(), 1.0)
    per_row = gx.cross_entropy(backend.tensor(z), backend.tensor(c), reduction="none", backend=backend.name)
    np.testing.assert_allclose(per_row.cpu().numpy(), -np.log(p[np.arange(6), c]), rtol=1e-10)


def test_predict_binary_threshold():
    p = np.array([0.1, 0.5, 0.49, 0.9])
    assert gx.predict_binary(p).dtype == np.int64
    assert gx.predict_binary(p).tolist() == [0, 1, 0, 1]
    assert gx.predict_binary(torch.from_numpy(p), threshold=0.95).tolist() == [0, 0, 0, 0]
    assert gx.predict(torch.tensor([[0.1, 0.9], [2.0, -1.0]])).dtype == torch.int64
