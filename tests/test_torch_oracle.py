"""fastopt against torch.optim, the oracle, on trajectories where the gradient depends on the iterate.

Every algorithm torch has runs in lockstep on a fastopt optimizer (NumPy arrays, default Numba
backend; a subset also on the NumPy reference) and on the torch optimizer (tensors, torch's
single-tensor path ``foreach=False``). The gradient at step k is that of a small coupled loss
(quadratic plus a cyclic Rosenbrock-like term) evaluated at each optimizer's *own* parameters, plus
seeded noise, so any discrepancy feeds back into later gradients instead of washing out.

Tolerances: float64 rtol 1e-12 (atol 1e-14 near 0), float32 rtol 1e-5 (atol 1e-6). The two sides
do not agree bit for bit, by design: torch's CPU kernels fuse ``addcmul``/``lerp``/``add(alpha=)``
into FMAs and compute ``addcdiv`` as ``(value * t1) / t2`` while the rules compute
``value * (t1 / t2)``; that is one rounding per operation, and the trajectories here are
contracting, so the float64 error stays within a few hundred ulps after 100+ steps.
For float64 runs torch's default dtype is float64 so that its scalar state (``step``, NAdam's
``mu_product``) is float64 like fastopt's host scalars; float32 runs keep torch's float32 default
(torch then rounds ``mu_product`` to float32, well inside the float32 bound).
"""

import numpy as np
import pytest
from oracle import torch_or_skip

import fastopt as fo

torch = torch_or_skip()

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("serial_kernels")]

STEPS = 120
SHAPES = ((5,), (2, 3), (4,))
TOL = {
    np.float64: {"rtol": 1e-12, "atol": 1e-14},
    np.float32: {"rtol": 1e-5, "atol": 1e-6},
}

# (id, fastopt/torch class name, hyperparameters); every flag of every algorithm appears at least once.
CASES = [
    ("sgd", "SGD", dict(lr=0.05)),
    ("sgd-wd", "SGD", dict(lr=0.05, weight_decay=0.1)),
    ("sgd-momentum", "SGD", dict(lr=0.03, momentum=0.9)),
    ("sgd-dampening-wd", "SGD", dict(lr=0.03, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    ("sgd-nesterov-wd", "SGD", dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("sgd-maximize", "SGD", dict(lr=0.05, momentum=0.5, maximize=True)),
    ("adagrad", "Adagrad", dict(lr=0.1)),
    ("adagrad-lrdecay-init", "Adagrad", dict(lr=0.2, lr_decay=0.01, initial_accumulator_value=0.1)),
    (
        "adagrad-wd-eps-maximize",
        "Adagrad",
        dict(lr=0.1, weight_decay=0.05, eps=1e-6, maximize=True),
    ),
    ("rmsprop", "RMSprop", dict(lr=0.01)),
    ("rmsprop-centered", "RMSprop", dict(lr=0.01, centered=True)),
    ("rmsprop-momentum", "RMSprop", dict(lr=0.005, momentum=0.9, alpha=0.9)),
    (
        "rmsprop-centered-momentum-wd",
        "RMSprop",
        dict(lr=0.005, momentum=0.8, centered=True, weight_decay=0.01, eps=1e-6),
    ),
    ("rmsprop-maximize-wd", "RMSprop", dict(lr=0.01, alpha=0.9, weight_decay=0.02, maximize=True)),
    ("adadelta", "Adadelta", dict()),
    ("adadelta-custom-wd", "Adadelta", dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.01)),
    ("adadelta-maximize", "Adadelta", dict(lr=2.0, maximize=True)),
    ("adam", "Adam", dict(lr=0.05)),
    ("adam-amsgrad", "Adam", dict(lr=0.05, amsgrad=True)),
    ("adam-wd", "Adam", dict(lr=0.05, weight_decay=0.05, eps=1e-6)),
    (
        "adam-maximize-amsgrad-betas",
        "Adam",
        dict(lr=0.05, betas=(0.8, 0.99), amsgrad=True, maximize=True),
    ),
    ("adam-decoupled", "Adam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adamw", "AdamW", dict(lr=0.05)),
    ("adamw-amsgrad", "AdamW", dict(lr=0.05, weight_decay=0.1, amsgrad=True)),
    ("adamw-maximize", "AdamW", dict(lr=0.05, betas=(0.85, 0.995), maximize=True)),
    ("adamax", "Adamax", dict(lr=0.05)),
    (
        "adamax-wd-maximize",
        "Adamax",
        dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.05, maximize=True),
    ),
    ("nadam", "NAdam", dict(lr=0.05)),
    ("nadam-momentum-decay", "NAdam", dict(lr=0.05, momentum_decay=0.01, betas=(0.85, 0.99))),
    ("nadam-wd", "NAdam", dict(lr=0.05, weight_decay=0.05)),
    ("nadam-decoupled", "NAdam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("nadam-maximize", "NAdam", dict(lr=0.05, maximize=True)),
    # beta2 = 0.999: rho_t <= 5 for t <= 5 (plain momentum step), rectified from t = 6 on.
    ("radam", "RAdam", dict(lr=0.05)),
    ("radam-wd", "RAdam", dict(lr=0.05, weight_decay=0.05)),
    ("radam-decoupled", "RAdam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("radam-maximize-betas", "RAdam", dict(lr=0.05, betas=(0.8, 0.99), maximize=True)),
    ("rprop", "Rprop", dict()),
    ("rprop-custom", "Rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-4, 0.2))),
    (
        "rprop-maximize",
        "Rprop",
        dict(lr=0.02, etas=(0.6, 1.1), step_sizes=(1e-3, 1.0), maximize=True),
    ),
]
CASE_IDS = [c[0] for c in CASES]
CASE_BY_ID = {c[0]: c for c in CASES}
# One representative of each algorithm for the structure and state-dict variants.
STRUCTURE_CASES = [
    "sgd-nesterov-wd",
    "adagrad-lrdecay-init",
    "rmsprop-centered-momentum-wd",
    "adadelta-custom-wd",
    "adam-amsgrad",
    "adamw-amsgrad",
    "adamax-wd-maximize",
    "nadam-decoupled",
    "radam-wd",
    "rprop-custom",
]
# Cases also run through the NumPy reference (backend="numpy"): the spec must match torch too.
REFERENCE_CASES = [
    "sgd-dampening-wd",
    "adagrad-lrdecay-init",
    "rmsprop-centered-momentum-wd",
    "adadelta-custom-wd",
    "adam-maximize-amsgrad-betas",
    "adamw-amsgrad",
    "adamax-wd-maximize",
    "nadam-momentum-decay",
    "nadam-decoupled",
    "radam-decoupled",
    "rprop-custom",
]
# torch's name of every per-element state array; the step count is compared separately.
TORCH_STATE = {
    "SGD": ("momentum_buffer",),
    "Adagrad": ("sum",),
    "RMSprop": ("square_avg", "momentum_buffer", "grad_avg"),
    "Adadelta": ("square_avg", "acc_delta"),
    "Adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "AdamW": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "Adamax": ("exp_avg", "exp_inf"),
    "NAdam": ("exp_avg", "exp_avg_sq"),
    "RAdam": ("exp_avg", "exp_avg_sq"),
    "Rprop": ("prev", "step_size"),
}


# ------------------------------------------------------------------------------------- problem
def initial_arrays(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.5, 1.5, size=s).astype(dtype) for s in SHAPES]


def loss_grad(x, k, i, sign=1.0):
    """Gradient of f(x) = sum a_j (x_j - c_j)^2 / 2 + sum (x_{j+1} - x_j^2)^2 / 4 (cyclic) at ``x``,
    plus deterministic noise for step ``k`` and array ``i``; in x's dtype. ``sign=-1`` gives the
    gradient of -f, which a ``maximize=True`` optimizer climbs (so it still minimises f)."""
    dt = x.dtype
    flat = x.reshape(-1)
    n = flat.size
    a = (0.5 + 1.5 * np.arange(n) / n).astype(dt)
    c = np.linspace(-0.5, 0.8, n).astype(dt)
    r = np.roll(flat, -1) - flat * flat  # r_j = x_{j+1} - x_j^2
    g = a * (flat - c) + dt.type(0.5) * (np.roll(r, 1) - dt.type(2) * flat * r)
    noise = np.random.default_rng([1234, k, i]).standard_normal(n).astype(dt)
    g = g + dt.type(0.1) * noise
    return (dt.type(sign) * g).reshape(x.shape)


# ------------------------------------------------------------------------------------- harness
@pytest.fixture(name="dtype", params=[np.float64, np.float32], ids=["f64", "f32"])
def torch_default_dtype(request):
    """The parameter dtype; float64 runs set torch's default dtype to float64 (and restore it)."""
    old = torch.get_default_dtype()
    if request.param is np.float64:
        torch.set_default_dtype(torch.float64)
    try:
        yield request.param
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield np.float64
    finally:
        torch.set_default_dtype(old)


# Two groups: the first array alone (own lr, and weight decay where the algorithm has it), then the
# rest (own weight decay). Rprop has no weight decay, so it varies lr only.
def group_overrides(name, kwargs):
    lr = kwargs.get("lr", 1.0 if name == "Adadelta" else 0.01)
    if name == "Rprop":
        return {"lr": 0.5 * lr}, {}
    wd = kwargs.get("weight_decay", 0.0)
    return {"lr": 0.5 * lr, "weight_decay": 0.0}, {"weight_decay": wd + 0.03}


class Pair:
    """A fastopt optimizer and a torch optimizer over equal copies of the same parameters."""

    def __init__(self, name, kwargs, dtype, structure="list", backend=None, lr=None, seed=0):
        self.name, self.structure, self.dtype = name, structure, dtype
        self.sign = -1.0 if kwargs.get("maximize", False) else 1.0
        arrays = initial_arrays(dtype, seed)
        fo_kwargs = dict(kwargs, backend=backend)
        if lr is not None:
            fo_kwargs["lr"] = lr
        cls = getattr(fo, name)
        self.names = [f"p{i}" for i in range(len(arrays))]
        if structure == "list":
            self.views = [a.copy() for a in arrays]
            self.opt = cls(self.views, **fo_kwargs)
        elif structure == "dict":
            params = {n: a.copy() for n, a in zip(self.names, arrays)}
            self.views = list(params.values())
            self.opt = cls(params, **fo_kwargs)
        elif structure == "paramset":
            self.ps = fo.ParamSet(dict(zip(self.names, arrays)))
            self.views = [self.ps[n] for n in self.names]
            self.opt = cls(self.ps, **fo_kwargs)
        elif structure == "groups":
            self.views = [a.copy() for a in arrays]
            ov0, ov1 = group_overrides(name, kwargs)
            self.opt = cls(
                [{"params": self.views[:1], **ov0}, {"params": self.views[1:], **ov1}], **fo_kwargs
            )
        else:
            raise AssertionError(structure)
        self.tparams = [torch.tensor(a.copy(), requires_grad=True) for a in arrays]
        tcls = getattr(torch.optim, name)
        if structure == "groups":
            ov0, ov1 = group_overrides(name, kwargs)
            tparams = [{"params": self.tparams[:1], **ov0}, {"params": self.tparams[1:], **ov1}]
        else:
            tparams = self.tparams
        self.topt = tcls(tparams, foreach=False, **kwargs)
        self.k = 0

    def step(self):
        k = self.k
        grads = [loss_grad(p, k, i, self.sign) for i, p in enumerate(self.views)]
        if self.structure == "list":
            self.opt.step(grads)
        elif self.structure == "dict":
            self.opt.step(dict(zip(self.names, grads)))
        elif self.structure == "paramset":
            for n, g in zip(self.names, grads):
                self.ps.grads[n][...] = g
            self.opt.step()
        else:
            self.opt.step([grads[:1], grads[1:]])
        for i, p in enumerate(self.tparams):
            p.grad = torch.from_numpy(loss_grad(p.detach().numpy(), k, i, self.sign))
        self.topt.step()
        self.k += 1

    def torch_values(self):
        return [p.detach().numpy() for p in self.tparams]


def assert_close(ours, theirs, dtype, what):
    tol = TOL[dtype]
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.dtype == dtype, f"{what}: dtype {ours.dtype}, expected {np.dtype(dtype)}"
    if not np.allclose(ours, theirs, **tol):
        np.testing.assert_allclose(ours, theirs, err_msg=what, **tol)


def run_and_compare(pair, steps=STEPS, label=""):
    """Step both optimizers ``steps`` times, comparing every parameter after every step."""
    for k in range(steps):
        pair.step()
        for i, (ours, theirs) in enumerate(zip(pair.views, pair.torch_values())):
            assert_close(ours, theirs, pair.dtype, f"{label} param {i} after step {k + 1}")
    # The trajectory must have moved (a test where nothing happens proves nothing).
    start = initial_arrays(pair.dtype)
    assert max(float(np.max(np.abs(v - s))) for v, s in zip(pair.views, start)) > 1e-2


def torch_state_arrays(pair, p):
    st = pair.topt.state[p]
    return {k: v.detach().numpy() for k, v in st.items() if k in TORCH_STATE[pair.name]}


def compare_state(pair, steps, label=""):
    """fastopt's state_dict() against torch's optimizer.state: names, step counts and values."""
    sd = pair.opt.state_dict()["state"]
    tstates = [pair.topt.state[p] for p in pair.tparams]
    if pair.structure == "paramset":
        assert set(sd) == {0}
        entries = [(sd[0], tstates, [torch_state_arrays(pair, p) for p in pair.tparams])]
    else:
        assert set(sd) == set(range(len(pair.tparams)))
        entries = [
            (sd[i], [tstates[i]], [torch_state_arrays(pair, p)]) for i, p in enumerate(pair.tparams)
        ]
    for ours, theirs_raw, theirs in entries:
        names = set(theirs[0])
        assert set(ours) - {"step", "mu_product"} == names, (label, sorted(ours), sorted(names))
        assert ours["step"] == steps
        for t in theirs_raw:
            if "step" in t:  # torch's SGD keeps no step count
                assert int(t["step"].item()) == steps
        if pair.name == "NAdam":
            for t in theirs_raw:
                mu = float(t["mu_product"].item())
                if pair.dtype is np.float64:
                    assert ours["mu_product"] == pytest.approx(mu, rel=1e-13, abs=0)
                else:  # torch keeps it in float32, where it underflows to subnormals after ~100
                    # steps; only 1 - mu_product enters the update, so compare absolutely
                    assert ours["mu_product"] == pytest.approx(mu, rel=1e-5, abs=1e-30)
        for n in names:
            ref = np.concatenate([t[n].reshape(-1) for t in theirs])
            mine = np.asarray(ours[n])
            if pair.structure == "paramset":
                assert mine.size == ref.size
                mine = mine.reshape(-1)
            else:
                assert mine.shape == ref.reshape(theirs[0][n].shape).shape
                ref = ref.reshape(mine.shape)
            assert_close(mine, ref, pair.dtype, f"{label} state {n!r}")


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASE_IDS)
def test_trajectory_and_state_match_torch(case, dtype):
    """Every flag of every algorithm torch has, both dtypes: parameters after each of 120 steps
    and the full optimizer state at the end."""
    _, name, kwargs = CASE_BY_ID[case]
    pair = Pair(name, kwargs, dtype)
    run_and_compare(pair, label=case)
    compare_state(pair, STEPS, label=case)


@pytest.mark.parametrize("structure", ["dict", "paramset", "groups"])
@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_structures_match_torch(case, structure, f64):
    """A dict of arrays, a ParamSet (one flat buffer, one kernel call) and two param groups with
    different lr / weight_decay follow torch exactly as plain lists do."""
    _, name, kwargs = CASE_BY_ID[case]
    pair = Pair(name, kwargs, f64, structure=structure)
    run_and_compare(pair, steps=100, label=f"{case}/{structure}")
    compare_state(pair, 100, label=f"{case}/{structure}")
    if structure == "groups":
        ov0, ov1 = group_overrides(name, kwargs)
        for g, ov in zip(pair.opt.param_groups, (ov0, ov1)):
            for k, v in ov.items():
                assert g[k] == v


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_numpy_reference_matches_torch(case, f64):
    """The NumPy reference (backend="numpy"), the readable spec, agrees with torch as well."""
    _, name, kwargs = CASE_BY_ID[case]
    pair = Pair(name, kwargs, f64, backend="numpy")
    run_and_compare(pair, steps=100, label=f"{case}/numpy")
    compare_state(pair, 100, label=f"{case}/numpy")


def test_radam_covers_both_regimes():
    """The RAdam cases above cross the rho_t > 5 switch: un-rectified for t <= 5, rectified after."""
    beta2 = 0.999
    rho_inf = 2 / (1 - beta2) - 1
    rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, 11)]
    assert [r > 5 for r in rho] == [False] * 5 + [True] * 5


@pytest.mark.parametrize("dt", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "name,kwargs",
    [("SGD", dict(momentum=0.9, weight_decay=0.01)), ("Adam", dict(amsgrad=False))],
    ids=["SGD", "Adam"],
)
def test_lr_callable_matches_lambdalr(name, kwargs, dt):
    """lr=lambda k: 0.1 * 0.9**k (k = steps taken) is torch's LambdaLR(base lr 0.1, k -> 0.9**k)
    stepped after every optimizer step."""
    old = torch.get_default_dtype()
    if dt is np.float64:
        torch.set_default_dtype(torch.float64)
    try:
        pair = Pair(name, dict(kwargs, lr=0.1), dt, lr=lambda k: 0.1 * 0.9**k)
        sched = torch.optim.lr_scheduler.LambdaLR(pair.topt, lambda k: 0.9**k)
        for k in range(100):
            assert pair.topt.param_groups[0]["lr"] == 0.1 * 0.9**k
            pair.step()
            sched.step()
            for i, (ours, theirs) in enumerate(zip(pair.views, pair.torch_values())):
                assert_close(ours, theirs, dt, f"{name} lr schedule, param {i} after step {k + 1}")
        assert pair.opt.state_dict()["param_groups"][0]["steps"] == 100
        compare_state(pair, 100, label=f"{name}/LambdaLR")
    finally:
        torch.set_default_dtype(old)


# A gradient whose square overflows while torch's second moment, which scales the gradient by
# (1 - beta) before squaring it (addcmul), stays finite: float32 |g| > 1.8e19, float64 > 1.3e154.
HUGE_GRADIENT = {np.float32: 1e20, np.float64: 1e155}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "name,kwargs,key",
    [
        ("Adam", dict(lr=0.1), "exp_avg_sq"),
        ("AdamW", dict(lr=0.1), "exp_avg_sq"),
        ("Adam", dict(lr=0.1, amsgrad=True), "exp_avg_sq"),
        ("NAdam", dict(lr=0.1), "exp_avg_sq"),
        ("RAdam", dict(lr=0.1), "exp_avg_sq"),
        ("RMSprop", dict(lr=0.01), "square_avg"),
        ("RMSprop", dict(lr=0.01, alpha=1.0), "square_avg"),  # (0 * g) * g = 0, not 0 * inf
    ],
)
def test_second_moment_of_a_huge_gradient_stays_finite_as_in_torch(name, kwargs, key, dtype):
    """One step with a gradient whose square overflows, then five ordinary ones: the state and
    the parameters follow torch (before, fastopt's second moment was inf from then on and the
    parameter never moved again, or NaN for RMSprop with alpha = 1)."""
    tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    w = np.full(3, 1.0, dtype)
    opt = getattr(fo, name)([w], **kwargs)
    tw = torch.nn.Parameter(torch.full((3,), 1.0, dtype=tdt))
    topt = getattr(torch.optim, name)([tw], foreach=False, **kwargs)
    for k in range(6):
        g = np.full(3, HUGE_GRADIENT[dtype] if k == 0 else 1.0, dtype)
        opt.step([g])
        tw.grad = torch.from_numpy(g.copy())
        topt.step()
        ours, ref = opt.state[0][key], topt.state[tw][key].numpy()
        assert np.all(np.isfinite(ours)) and np.all(np.isfinite(ref)), (k, ours, ref)
        np.testing.assert_allclose(ours, ref, rtol=1e-6 if dtype == np.float32 else 1e-12)
        np.testing.assert_allclose(w, tw.detach().numpy(), **TOL[dtype])


@pytest.mark.parametrize(
    "name", ["Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Adadelta"]
)
def test_eps_zero_is_taken_as_torch_takes_it(name, f64):
    """torch checks only eps >= 0; with eps = 0 (and gradients that are never 0) both divide by
    the bare root of the second moment, float64, 20 steps."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal(4)
    tw = torch.nn.Parameter(torch.from_numpy(w.copy()))
    opt = getattr(fo, name)([w], lr=0.01, eps=0.0)
    topt = getattr(torch.optim, name)([tw], lr=0.01, eps=0.0, foreach=False)
    for _ in range(20):
        g = rng.uniform(0.5, 2.0, 4) * rng.choice([-1.0, 1.0], 4)
        opt.step([g.copy()])
        tw.grad = torch.from_numpy(g)
        topt.step()
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-12, atol=1e-14)
