"""The worked examples of Dive into Deep Learning, ch. 12 (Optimization Algorithms), as assertions.

Each problem is two-dimensional at most, so thousands of steps take milliseconds. The optimizers
run on their default backend (the Numba CPU kernels). Where the book prints a result, the test
checks our optimizer reproduces it (the book prints 6 decimals); where it does not, the
thresholds were measured by running the optimizer and hold with a wide margin (noted next to them).

Book: Zhang, Lipton, Li & Smola, "Dive into Deep Learning", https://d2l.ai, ch. 12.3-12.10.
The book's objective functions and starting points are used throughout:
  f(x) = x^2 from x0 = 10 (12.3.1); f(x) = 0.1 x1^2 + 2 x2^2 from (-5, -2) (12.6-12.8);
  Rosenbrock f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2) (a standard non-convex test).
"""

import numpy as np
import pytest

import fastopt as fo

pytestmark = pytest.mark.usefixtures("serial_kernels")  # conftest.py


def square_grad(x):
    return 2 * x  # f(x) = x^2


def ellipse_f(x):
    return 0.1 * x[0] ** 2 + 2 * x[1] ** 2


def ellipse_grad(x):
    return np.array([0.2 * x[0], 4 * x[1]], dtype=x.dtype)


def rosenbrock_grad(x, a=1.0, b=100.0):
    return np.array(
        [-2 * (a - x[0]) - 4 * b * x[0] * (x[1] - x[0] ** 2), 2 * b * (x[1] - x[0] ** 2)],
        dtype=x.dtype,
    )


def trajectory(cls, grad, x0, steps, dtype=np.float64, **kwargs):
    """Iterates x_1 .. x_steps of ``cls`` (a fastopt optimizer) from ``x0``, as a (steps, n) array."""
    x = np.array(x0, dtype=dtype)
    opt = cls([x], **kwargs)
    out = np.empty((steps, x.size), dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            opt.step([grad(x)])
            out[t] = x
    return out


# ------------------------------------------------------------------------------------- 12.3
@pytest.mark.parametrize("eta", [0.2, 0.05, 1.1])
def test_gd_on_square_follows_closed_form(eta):
    """12.3.1: gradient descent x <- x - eta * 2x, i.e. x_t = (1 - 2 eta)^t x0, for every t."""
    steps = 100 if eta != 1.1 else 30
    tr = trajectory(fo.SGD, square_grad, [10.0], steps, lr=eta)[:, 0]
    closed = (1 - 2 * eta) ** np.arange(1, steps + 1) * 10.0
    np.testing.assert_allclose(tr, closed, rtol=1e-12, atol=0)


def test_gd_on_square_textbook_regimes():
    """The book's three learning rates (its printed value after 10 epochs in the comments)."""
    good = trajectory(fo.SGD, square_grad, [10.0], 100, lr=0.2)[:, 0]
    assert good[9] == pytest.approx(0.060466, abs=5e-7)  # book: "epoch 10, x: 0.060466"
    assert abs(good[99]) < 1e-6  # 0.6^100 * 10 = 6.5e-22: converged

    slow = trajectory(fo.SGD, square_grad, [10.0], 10, lr=0.05)[:, 0]
    assert slow[9] == pytest.approx(3.486784, abs=5e-7)  # book: "epoch 10, x: 3.486784"
    assert slow[9] > 3  # too small a step: still far away after 10 steps
    assert np.all(np.diff(slow) < 0)  # but monotone progress

    bad = trajectory(fo.SGD, square_grad, [10.0], 30, lr=1.1)[:, 0]
    assert bad[9] == pytest.approx(61.917364, abs=5e-7)  # book: "epoch 10, x: 61.917364"
    assert np.all(np.diff(np.abs(bad)) > 0)  # |x| grows every step: |1 - 2.2| = 1.2 > 1
    assert np.all(np.sign(bad[1:]) == -np.sign(bad[:-1]))  # overshooting: the sign alternates
    assert abs(bad[19]) > 380 and abs(bad[29]) > 2e3  # 1.2^20 * 10 = 383.4, 1.2^30 * 10 = 2373.8


def test_gd_on_square_float32():
    """The same recursion in float32 stays float32 and on the closed form to float32 rounding."""
    tr = trajectory(fo.SGD, square_grad, [10.0], 50, dtype=np.float32, lr=0.2)[:, 0]
    assert tr.dtype == np.float32
    closed = 0.6 ** np.arange(1, 51) * 10.0
    np.testing.assert_allclose(tr, closed, rtol=2e-5, atol=0)


def test_gd_multivariate_textbook():
    """12.3.2: f(x) = x1^2 + 2 x2^2, eta = 0.1, 20 epochs from (-5, -2)."""
    tr = trajectory(fo.SGD, lambda x: np.array([2 * x[0], 4 * x[1]]), [-5.0, -2.0], 20, lr=0.1)
    np.testing.assert_allclose(tr[-1], [0.8**20 * -5, 0.6**20 * -2], rtol=1e-12)
    assert tr[-1] == pytest.approx([-0.057646, -0.000073], abs=5e-7)  # book's printout


# ------------------------------------------------------------------------------------- 12.6
def test_gd_on_ellipse_learning_rates():
    """12.6.1: on the ill-conditioned f = 0.1 x1^2 + 2 x2^2, eta = 0.4 crawls along x1 while
    eta = 0.6 diverges along x2 (|1 - 4 * 0.6| = 1.4 > 1); closed forms per coordinate."""
    t = np.arange(1, 21)
    tr = trajectory(fo.SGD, ellipse_grad, [-5.0, -2.0], 20, lr=0.4)
    np.testing.assert_allclose(tr[:, 0], (1 - 0.2 * 0.4) ** t * -5, rtol=1e-12)
    np.testing.assert_allclose(tr[:, 1], (1 - 4 * 0.4) ** t * -2, rtol=1e-12)
    assert tr[-1] == pytest.approx([-0.943467, -0.000073], abs=5e-7)  # book: epoch 20
    assert abs(tr[-1, 0]) > 0.9  # x1 still far from 0: the slow direction

    tr = trajectory(fo.SGD, ellipse_grad, [-5.0, -2.0], 20, lr=0.6)
    np.testing.assert_allclose(tr[:, 1], (1 - 4 * 0.6) ** t * -2, rtol=1e-12)
    assert tr[-1] == pytest.approx([-0.387814, -1673.365109], abs=5e-6)  # book: epoch 20
    assert np.all(np.diff(np.abs(tr[:, 1])) > 0)  # diverges in x2


def test_momentum_converges_where_gd_diverges():
    """12.6.2: heavy-ball momentum (beta = 0.5, eta = 0.6) converges on the ellipse where plain GD
    with the same eta diverges. The book's v <- beta v + g, x <- x - eta v (v_0 = 0) is torch's
    SGD(momentum=beta) with buffer b_1 = g_1, so the book's printed iterates are reproduced."""
    tr = trajectory(fo.SGD, ellipse_grad, [-5.0, -2.0], 100, lr=0.6, momentum=0.5)
    assert tr[19] == pytest.approx([0.007188, 0.002553], abs=5e-7)  # book: epoch 20
    # Both coordinates contract like sqrt(beta)^t = 0.707^t (complex roots of z^2 - (1 + beta -
    # eta lambda) z + beta): 5 * 0.707^100 ~ 4e-15.
    assert np.max(np.abs(tr[-1])) < 1e-10

    plain = trajectory(fo.SGD, ellipse_grad, [-5.0, -2.0], 100, lr=0.6)
    assert abs(plain[-1, 1]) > 1e10

    low = trajectory(fo.SGD, ellipse_grad, [-5.0, -2.0], 20, lr=0.6, momentum=0.25)
    assert low[-1] == pytest.approx([-0.126340, -0.186632], abs=5e-7)  # book: beta = 0.25


# ------------------------------------------------------------------------------------- 12.7-12.10
# The book's Adagrad and RMSprop put eps = 1e-6 inside the square root; torch (and fastopt) add
# eps = 1e-10 / 1e-8 outside it, which moves the printed 6-decimal values by at most ~1e-6.
def test_adagrad_textbook():
    """12.7.4: Adagrad on the ellipse, 20 epochs, eta = 0.4 (slow: the accumulated squares shrink
    the steps) and eta = 2 (near the optimum)."""
    tr = trajectory(fo.Adagrad, ellipse_grad, [-5.0, -2.0], 20, lr=0.4)
    assert tr[-1] == pytest.approx([-2.382563, -0.158591], abs=3e-6)  # book: epoch 20
    assert abs(tr[-1, 0]) > 2  # still far along x1

    tr = trajectory(fo.Adagrad, ellipse_grad, [-5.0, -2.0], 20, lr=2.0)
    # book: "epoch 20, x1: -0.002295, x2: -0.000000"
    assert tr[-1] == pytest.approx([-0.002295, 0.0], abs=3e-6)
    assert ellipse_f(tr[-1]) < 1e-5


def test_rmsprop_textbook():
    """12.8.3: RMSprop on the ellipse, eta = 0.4, gamma (torch's alpha) = 0.9, 20 epochs."""
    tr = trajectory(fo.RMSprop, ellipse_grad, [-5.0, -2.0], 20, lr=0.4, alpha=0.9)
    # Book: "epoch 20, x1: -0.010599, x2: 0.000000". Near the optimum g1^2 ~ 1e-6, so the book's
    # eps-inside-the-root matters a little more here: we land at -0.010598.
    assert tr[-1] == pytest.approx([-0.010599, 0.0], abs=3e-6)
    assert ellipse_f(tr[-1]) < 2e-5


def test_adadelta_reaches_the_optimum():
    """12.9: Adadelta (lr = 1, rho = 0.9, eps = 1e-6, torch's defaults) has no learning rate to tune;
    the book runs it on the airfoil data only. On the ellipse its steps start at ~sqrt(eps) and grow
    as acc_delta fills: measured f = 10.2 -> 7.4 (100 steps) -> 1e-2 (1000) -> <= 9e-4 from step
    1500 on, where it hovers; the bounds below leave a factor >= 5 of margin."""
    tr = trajectory(fo.Adadelta, ellipse_grad, [-5.0, -2.0], 3000)
    f = ellipse_f(tr.T)
    assert f[99] < 8.5 and f[99] > 1  # slow start
    assert f[999] < 0.05
    assert np.max(f[1499:]) < 5e-3
    assert np.max(np.abs(tr[1499:])) < 0.1


def test_adam_on_ellipse():
    """12.10: Adam (the book trains it on the airfoil data; here on the ellipse). Measured with
    lr = 0.1: max|x| = 0.039 after 100 steps, <= 1.7e-4 from step 200, 2.7e-11 at 500."""
    tr = trajectory(fo.Adam, ellipse_grad, [-5.0, -2.0], 500, lr=0.1)
    assert np.max(np.abs(tr[99])) < 0.2
    assert np.max(np.abs(tr[199:])) < 2e-3
    assert np.max(np.abs(tr[-1])) < 1e-8
    # torch's default lr = 1e-3 barely moves in 500 steps (|x1| 5 -> 4.5): the step is ~lr.
    slow = trajectory(fo.Adam, ellipse_grad, [-5.0, -2.0], 500)
    assert 4.0 < abs(slow[-1, 0]) < 5.0


def test_yogi_on_ellipse():
    """12.10.3: Yogi (the book's fix for Adam's v_t blow-up). Measured with lr = 0.1: max|x| =
    0.022 after 100 steps, <= 1.1e-4 from step 200, 6e-12 at 500."""
    tr = trajectory(fo.Yogi, ellipse_grad, [-5.0, -2.0], 500, lr=0.1)
    assert np.max(np.abs(tr[99])) < 0.2
    assert np.max(np.abs(tr[199:])) < 2e-3
    assert np.max(np.abs(tr[-1])) < 1e-8


def test_lion_on_ellipse():
    """Lion (not in the book): sign steps of exactly lr, so with a constant lr it ends in a band of
    width ~lr around the optimum (measured: +-0.02 for lr = 0.03), and with a decaying lr it
    converges (measured max|x| = 1.1e-3 over steps 800-1000 for lr_k = 0.05 * 0.995^k)."""
    tr = trajectory(fo.Lion, ellipse_grad, [-5.0, -2.0], 1000, lr=0.03)
    np.testing.assert_allclose(np.abs(np.diff(tr[:50], axis=0)), 0.03, rtol=1e-9)  # |step| = lr
    assert np.max(np.abs(tr[499:])) <= 2 * 0.03
    tr = trajectory(fo.Lion, ellipse_grad, [-5.0, -2.0], 1000, lr=lambda k: 0.05 * 0.995**k)
    assert np.max(np.abs(tr[799:])) < 5e-3


# ------------------------------------------------------------------------------------- Rosenbrock
def test_adam_on_rosenbrock():
    """Adam, lr = 0.02, from (-1.5, 2) down the curved valley to (1, 1). Measured max|x - 1| = 0.40
    at step 1000, 9.3e-3 at 2000, 5.3e-4 from step 2500 on."""
    tr = trajectory(fo.Adam, rosenbrock_grad, [-1.5, 2.0], 3000, lr=0.02)
    assert np.max(np.abs(tr[999] - 1)) > 0.1  # the valley is slow: not there yet at 1000
    assert np.max(np.abs(tr[2499:] - 1)) < 5e-3


def test_momentum_on_rosenbrock_beats_plain_gd():
    """SGD with heavy-ball momentum (lr = 1e-3, beta = 0.9) reaches (1, 1) in 3000 steps (measured
    max|x - 1| = 3.6e-6; Nesterov 2.4e-6); plain GD at the same lr is still 0.39 away, and plain GD
    with a step large enough to move faster along the valley (2.5e-3) diverges across it."""
    for nesterov in (False, True):
        tr = trajectory(
            fo.SGD, rosenbrock_grad, [-1.5, 2.0], 3000, lr=1e-3, momentum=0.9, nesterov=nesterov
        )
        assert np.max(np.abs(tr[-1] - 1)) < 1e-4
    plain = trajectory(fo.SGD, rosenbrock_grad, [-1.5, 2.0], 3000, lr=1e-3)
    assert np.max(np.abs(plain[-1] - 1)) > 0.1
    # Measured: |x| = 1.8e13 after 6 steps (and NaN soon after; stop before non-finite gradients).
    fast = trajectory(fo.SGD, rosenbrock_grad, [-1.5, 2.0], 6, lr=2.5e-3)
    assert np.all(np.isfinite(fast)) and np.max(np.abs(fast[-1])) > 1e6
