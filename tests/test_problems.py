"""fastopt.problems: gradients against central finite differences, minima are minima, shapes; and
the playground's runs reproduce the numbers Dive into Deep Learning prints (ch. 12)."""

import numpy as np
import pytest
from oracle import import_or_skip

from fastopt import playground, problems

VARIANTS = [(name, {}) for name in problems.PROBLEMS] + [
    ("quadratic", {"a": 1.0, "b": 4.0}),
    ("rosenbrock", {"a": 2.0, "b": 10.0}),
]
IDS = [name + "".join(f"-{k}{v:g}" for k, v in kw.items()) for name, kw in VARIANTS]


def _points(problem, n=64, seed=0):
    """Random points across (and a little beyond) the problem's window: shape (dim, n)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(lo - 1, hi + 1, n) for lo, hi in problem.window])


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_gradient_matches_central_differences(name, kw):
    p = problems.get_problem(name, **kw)
    x = _points(p)
    g = p.grad(x)
    assert g.shape == x.shape
    h = 1e-6
    for d in range(p.dim):
        e = np.zeros((p.dim, 1))
        e[d] = h
        fd = (p.value(x + e) - p.value(x - e)) / (2 * h)
        scale = np.maximum(1.0, np.abs(g[d]))
        np.testing.assert_allclose(g[d], fd, rtol=0, atol=1e-5 * scale.max())
        assert np.all(np.abs(g[d] - fd) <= 1e-5 * scale)


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_minimum_is_a_minimum(name, kw):
    p = problems.get_problem(name, **kw)
    if p.minimum is None:
        # the saddle: a stationary point that is not a minimum, f unbounded below
        assert name == "saddle"
        np.testing.assert_array_equal(p.grad(p.stationary), 0.0)
        t = np.array([1.0, 10.0, 100.0])
        assert np.all(np.diff(p.value(np.stack([np.zeros(3), t]))) < 0)
        assert p.min_value is None
        return
    m = np.array(p.minimum)
    assert p.min_value == pytest.approx(float(p.value(m)))
    np.testing.assert_allclose(p.grad(m), 0.0, atol=1e-12)
    # lower than every point around it, near and far
    rng = np.random.default_rng(1)
    for radius in (1e-3, 0.1, 1.0, 3.0):
        pts = m[:, None] + radius * rng.standard_normal((p.dim, 200))
        assert np.all(p.value(pts) > p.min_value)
    assert np.all(p.value(_points(p)) >= p.min_value)


@pytest.mark.parametrize("name", list(problems.PROBLEMS))
def test_shapes_and_metadata(name):
    p = problems.get_problem(name)
    assert p.value(p.start).shape == ()
    assert p.grad(p.start).shape == (p.dim,)
    grid = np.zeros((p.dim, 3, 4))
    assert p.value(grid).shape == (3, 4)
    assert p.grad(grid).shape == (p.dim, 3, 4)
    assert len(p.start) == len(p.window) == p.dim
    assert all(lo < hi for lo, hi in p.window)
    assert p.formula and p.tex and p.source and name in p.describe()
    assert float(p(p.start)) == float(p.value(p.start))
    with pytest.raises(ValueError, match="points of shape"):
        p.value(np.zeros(p.dim + 1))


def test_bad_names_and_parameters():
    with pytest.raises(ValueError, match="unknown problem 'nope'; known: square"):
        problems.get_problem("nope")
    with pytest.raises(ValueError, match="no parameter 'c'; its parameters: a, b"):
        problems.get_problem("quadratic", c=1)
    # fastopt.validation's checks: ValueError for a wrong value, TypeError for a wrong type
    with pytest.raises(ValueError, match=r"invalid a: 0 \(must be > 0\)"):
        problems.get_problem("quadratic", a=0)
    with pytest.raises(ValueError, match=r"invalid b: nan \(must be finite\)"):
        problems.get_problem("rosenbrock", b=float("nan"))
    with pytest.raises(TypeError, match="a must be a real number, got 'x'"):
        problems.get_problem("rosenbrock", a="x")
    with pytest.raises(TypeError, match="b must be a real number, got True"):
        problems.get_problem("quadratic", b=True)


def test_textbook_formulas():
    assert problems.get_problem("ellipse").value([-5.0, -2.0]) == pytest.approx(0.1 * 25 + 2 * 4)
    assert problems.get_problem("quadratic").value([1.0, 1.0]) == pytest.approx(3.0)
    assert problems.get_problem("quadratic", a=1, b=4).value([1.0, 1.0]) == pytest.approx(5.0)
    assert problems.get_problem("rosenbrock").minimum == (1.0, 1.0)
    # the plateau really is flat at its start point
    p = problems.get_problem("plateau")
    assert np.abs(p.grad(p.start)).max() < 0.05


# The book prints these after the runs of its presets (D2L 12.3.1, 12.6, 12.7, 12.8; 6 decimals).
BOOK = {
    "gd-lr": [(3.486784,), (0.060466,), (61.917364,)],
    "momentum": [(-0.943467, -0.000073), (-0.126340, -0.186632), (0.007188, 0.002553)],
}


@pytest.mark.parametrize("preset", ["gd-lr", "momentum"])
def test_presets_reproduce_the_book(preset):
    pr = playground.PRESETS[preset]
    p = problems.get_problem(pr.problem)
    for spec, want in zip(pr.optimizers, BOOK[preset], strict=True):
        run = playground.run(p, spec, steps=pr.steps)
        assert run.points.shape == (pr.steps + 1, p.dim)
        np.testing.assert_allclose(run.points[-1], want, atol=5e-7)
        assert not run.diverged


def test_adaptive_preset_matches_the_book():
    p = problems.get_problem("ellipse")
    # Adagrad (12.7): x1 -2.382563, x2 -0.158591; RMSProp gamma 0.9 (12.8): -0.010599, 0.000000.
    # The book adds eps = 1e-6 inside the square root, torch 1e-10 / 1e-8 outside: 6 decimals agree.
    ada = playground.run(p, "adagrad:lr=0.4", steps=20)
    np.testing.assert_allclose(ada.points[-1], (-2.382563, -0.158591), atol=2e-6)
    rms = playground.run(p, "rmsprop:lr=0.4,alpha=0.9", steps=20)
    np.testing.assert_allclose(rms.points[-1], (-0.010599, 0.0), atol=2e-6)


def test_run_stops_when_diverging():
    p = problems.get_problem("square")
    run = playground.run(p, "sgd:lr=3.0", steps=2000)
    assert run.diverged
    assert np.isfinite(run.points).all() and np.isfinite(run.values).all()
    assert len(run.points) < 2001


def test_run_rejects_a_bad_start():
    p = problems.get_problem("ellipse")
    with pytest.raises(ValueError, match="2 coordinate"):
        playground.run(p, "sgd:lr=0.1", start=(1.0,))


@pytest.mark.parametrize("problem", ["ellipse", "square", "saddle"])
def test_diverging_run_is_drawn_clipped_without_warnings(problem, tmp_path, monkeypatch):
    """sgd lr=1e4 reaches f ~ 1e300 before it stops: the loss panel used to come out empty
    (a log axis over 300 decades) with matplotlib's overflow warning. Now the curve is clipped,
    on the chart, and the legend says the run diverged; no warning escapes."""
    import_or_skip("matplotlib")
    import warnings

    from fastopt.playground import drawing

    figures = []
    save = drawing.save_figure

    def keep(fig, path, title=None):
        figures.append(fig)
        save(fig, path, title)

    monkeypatch.setattr(drawing, "save_figure", keep)
    p = problems.get_problem(problem)
    runs = [playground.run(p, "sgd:lr=1e4", steps=200), playground.run(p, "adam:lr=0.1", steps=50)]
    assert runs[0].diverged and runs[0].values.max() > 1e100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            playground.plot_trajectories(p, runs, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0
    ax_loss = figures[0].axes[-1]
    lo, hi = ax_loss.get_ylim()
    assert np.isfinite([lo, hi]).all()
    for line in ax_loss.get_lines():
        y = np.asarray(line.get_ydata(), dtype=float)
        y = y[np.isfinite(y)]
        assert y.size and lo <= y.min() and y.max() <= hi  # drawn inside the panel
    labels = [t.get_text() for t in ax_loss.get_legend().get_texts()]
    assert labels[0].startswith("sgd lr=10000 (diverged after") and "clipped from step" in labels[0]
    assert labels[1] == "adam lr=0.1"
