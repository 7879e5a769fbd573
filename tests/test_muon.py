"""Muon against torch.optim.Muon (float64 and float32 with torch's iteration run in that dtype,
the bfloat16 default against torch as shipped), the AdamW fallback and muon_param_groups, state
and checkpoints, bad input, the Trainer on digits."""

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt.optim import muon as muon_module
from fastopt.optim.muon import adjusted_lr, hidden_matrices
from fastopt.optim.newton_schulz import round_to_bfloat16

torch = import_or_skip("torch")

SHAPES = ((6, 4), (4, 6), (5, 5))  # tall (torch transposes it), wide, square


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Small matrix products on 2 BLAS threads of a busy machine (CI) can take 100x longer than
    on one: torch's and NumPy's BLAS run on one thread here."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def ns_in_param_dtype(monkeypatch):
    """torch's Newton–Schulz iteration run in the gradient's dtype: its ``grad.bfloat16()``
    cast (torch/optim/_muon.py) patched to a copy."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())


def _grads(rng, shapes, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _run_pair(dtype, ns_dtype, steps=100, shapes=SHAPES, clip=None, **kw):
    """Max |fastopt - torch| over the parameters, relative to max |torch|, after ``steps``."""
    rng = np.random.default_rng(0)
    ps = fo.ParamSet({f"w{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)})
    tp = [torch.nn.Parameter(torch.tensor(ps[n].copy())) for n in ps.names]
    opt = fo.Muon(ps, lr=0.02, ns_dtype=ns_dtype, max_grad_norm=clip, **kw)
    topt = torch.optim.Muon(tp, lr=0.02, **kw)
    for _ in range(steps):
        for n, g, t in zip(ps.names, _grads(rng, shapes, dtype), tp):
            ps.grads[n][...] = g
            t.grad = torch.tensor(g)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tp, clip)
        opt.step()
        topt.step()
    ref = [t.detach().numpy() for t in tp]
    return max(np.abs(ps[n] - r).max() for n, r in zip(ps.names, ref)) / max(
        np.abs(r).max() for r in ref
    )


SETTINGS = [
    {},
    {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
    {"adjust_lr_fn": "original", "weight_decay": 0.5, "momentum": 0.5},
]


@pytest.mark.parametrize("kw", SETTINGS)
def test_float64_matches_torch_with_its_iteration_in_float64(ns_in_param_dtype, kw):
    assert _run_pair(np.float64, "float64", **kw) < 1e-10


@pytest.mark.parametrize("kw", SETTINGS[:2])
def test_float32_matches_torch_with_its_iteration_in_float32(ns_in_param_dtype, kw):
    assert _run_pair(np.float32, "float32", **kw) < 1e-5


def test_gradient_norm_clipping_is_fused_into_both_momentum_passes(ns_in_param_dtype):
    assert _run_pair(np.float64, "float64", steps=20, clip=1.0) < 1e-10


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "torch-products"])
def test_bfloat16_default_matches_torch_as_shipped_to_bfloat16_resolution(monkeypatch, native):
    """torch runs the iteration in bfloat16; the default emulates it (rounding every stored
    result) or, on CPUs with native bfloat16 products, runs torch's (both forced here, on any
    CPU): closer to torch than the float32 iteration is, and within a few bfloat16 ulps of the
    steps taken."""
    monkeypatch.setattr(muon_module, "native_bfloat16_products", lambda: native)
    assert fo.Muon.__init__.__signature__.parameters["ns_dtype"].default == "bfloat16"
    bf16 = _run_pair(np.float32, "bfloat16")
    f32 = _run_pair(np.float32, "float32")
    assert (
        bf16 < 2e-4
    )  # 100 steps of lr 0.02 on parameters of size ~3: 2**-8 per step would be 7e-3
    assert bf16 < f32 / 4


def test_bfloat16_rounding_is_ml_dtypes_bit_for_bit():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    special = np.array([np.inf, -np.inf, np.nan, 3.4e38, -3.39e38, 1e-40, 0.0, -0.0], np.float32)
    x = np.concatenate([bits.view(np.float32), special, rng.standard_normal(1000, np.float32)])
    with np.errstate(invalid="ignore"):
        ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    round_to_bfloat16(x)
    assert np.array_equal(x.view(np.uint32), ref.view(np.uint32))


def test_defaults_are_torchs():
    ref = torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]).defaults
    ours = fo.Muon([np.zeros((2, 2))]).defaults
    for k, v in ref.items():
        assert ours[k] == v, k
    assert adjusted_lr(1.0, None, (8, 2)) == 2.0 and adjusted_lr(1.0, None, (2, 8)) == 1.0
    assert adjusted_lr(1.0, "match_rms_adamw", (4, 16)) == pytest.approx(0.8)


def _mlp_params(rng, dtype=np.float64):
    shapes = {"emb": (12, 5), "h1": (5, 7), "h1.bias": (7,), "h2": (7, 5), "out": (5, 3)}
    return fo.ParamSet({k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()})


def test_muon_param_groups_is_torch_muon_plus_adamw_in_one_optimizer(ns_in_param_dtype):
    """The recipe: Muon for the hidden matrices, AdamW for the embedding, the output layer and
    the bias, one optimizer over one ParamSet stepping on its gradient buffer; equal to
    torch.optim.Muon and torch.optim.AdamW over the same split."""
    rng = np.random.default_rng(2)
    ps = _mlp_params(rng)
    assert hidden_matrices(list(ps.shapes.items())) == ("h1", "h2")
    adamw = dict(adamw_lr=3e-3, adamw_betas=(0.9, 0.95), adamw_eps=1e-10, adamw_weight_decay=0.01)
    opt = fo.Muon(fo.muon_param_groups(ps, **adamw), lr=0.02, ns_dtype="float64")
    tp = {n: torch.nn.Parameter(torch.tensor(ps[n].copy())) for n in ps.names}
    t_muon = torch.optim.Muon([tp["h1"], tp["h2"]], lr=0.02)
    rest = [tp[n] for n in ("emb", "h1.bias", "out")]
    t_adamw = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01)
    for _ in range(100):
        for n in ps.names:
            g = rng.standard_normal(ps.shapes[n])
            ps.grads[n][...] = g
            tp[n].grad = torch.tensor(g)
        opt.step()
        t_muon.step()
        t_adamw.step()
    for n in ps.names:
        np.testing.assert_allclose(ps[n], tp[n].detach().numpy(), rtol=1e-10, atol=1e-12)
    state = opt.state_dict()["state"][0]
    assert set(state) == {"step", "momentum_buffer", "exp_avg", "exp_avg_sq"}


def test_state_dict_round_trip_and_checkpoint(tmp_path):
    rng = np.random.default_rng(3)
    ps_a, ps_b = _mlp_params(rng, np.float32), None
    ps_b = fo.ParamSet(ps_a.to_dict())
    a = fo.Muon(fo.muon_param_groups(ps_a), lr=0.02)
    grads = [rng.standard_normal(ps_a.size).astype(np.float32) for _ in range(6)]
    for g in grads[:3]:
        a.step([g])
    path = fo.save(tmp_path / "m.ckpt", params=ps_a, optimizer=a)
    b = fo.Muon(fo.muon_param_groups(ps_b), lr=0.5)
    fo.load(path).restore(params=ps_b, optimizer=b)
    assert b.param_groups[0]["lr"] == 0.02
    c = fo.Muon(fo.muon_param_groups(fo.ParamSet(ps_a.to_dict())), lr=0.02)
    c.load_state_dict(a.state_dict())
    for g in grads[3:]:
        a.step([g])
        b.step([g])
        c.step([g])
    assert np.array_equal(ps_a.flat, ps_b.flat)
    assert np.array_equal(ps_a.flat, c.units()[0].param)


def test_plain_arrays_and_dicts_step_like_a_paramset():
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal(s) for s in SHAPES]
    ps = fo.ParamSet({str(i): w for i, w in enumerate(ws)})
    opt_ps = fo.Muon(ps, lr=0.02, ns_dtype="float64")
    opt_list = fo.Muon(ws, lr=0.02, ns_dtype="float64")
    for _ in range(3):
        gs = _grads(rng, SHAPES, np.float64)
        opt_list.step(gs)
        opt_ps.step(np.concatenate([g.ravel() for g in gs]))
    for i, w in enumerate(ws):
        assert np.array_equal(ps[str(i)], w)


def test_bad_input_is_refused_before_anything_is_written():
    rng = np.random.default_rng(5)
    ps = _mlp_params(rng)
    with pytest.raises(ValueError, match=r"'h1.bias' has shape \(7,\).*fallback"):
        fo.Muon(ps)
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(3,\)"):
        fo.Muon([np.zeros((2, 2)), np.zeros(3)])
    with pytest.raises(ValueError, match="not parameters of the group"):
        fo.Muon(ps, muon_params=["h1", "nope"])
    with pytest.raises(ValueError, match="'h1.bias' has shape"):
        fo.Muon([{"params": ps, "muon_params": None}], muon_params="hidden")
    for bad, err in (
        ({"ns_steps": 100}, ValueError),
        ({"ns_steps": -1}, ValueError),
        ({"adjust_lr_fn": "rms"}, ValueError),
        ({"ns_dtype": "float16"}, ValueError),
        ({"ns_coefficients": (1.0, 2.0)}, ValueError),
        ({"momentum": -0.1}, ValueError),
        ({"weight_decay": -1.0}, ValueError),
        ({"muon_params": "all"}, ValueError),
        ({"muon_params": 3}, TypeError),
    ):
        with pytest.raises(err):
            fo.Muon([np.zeros((2, 2))], **bad)
    opt = fo.Muon(fo.muon_param_groups(ps), lr=0.02)
    before = ps.flat.copy()
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.zeros(ps.size + 1)])
    with pytest.raises(RuntimeError, match="numba-cpu"):
        fo.Muon([np.zeros((2, 2))], backend="numpy").step([np.ones((2, 2))])
    opt.param_groups[0]["muon_params"] = None  # re-checked at the next step, before writes
    with pytest.raises(ValueError, match="'h1.bias' has shape"):
        opt.step()
    assert np.array_equal(ps.flat, before) and not opt.state


def test_nonfinite_gradients_skip_or_propagate_as_the_other_optimizers():
    w = np.ones((3, 4))
    opt = fo.Muon([w], lr=0.1, skip_nonfinite=True)
    g = np.ones((3, 4))
    g[1, 2] = np.nan
    opt.step([g])
    assert opt.last_step_taken is False and opt.skipped_steps == 1 and np.all(w == 1)
    opt = fo.Muon([w], lr=0.1)
    opt.step([g])
    assert np.isnan(w).all()  # torch: the NaN spreads through the matrix products


def test_fastopt_torch_adapter_matches_torch_muon(ns_in_param_dtype):
    fot = pytest.importorskip("fastopt.torch")
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(
            torch.nn.Linear(6, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=False)
        ).double()
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        fot.Muon(models[0].parameters(), lr=0.02, ns_dtype="float64"),
        torch.optim.Muon(models[1].parameters(), lr=0.02),
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert (a - b).abs().max().item() < 1e-10


def test_cli_spec_builds_muon():
    from fastopt import playground

    spec = playground.parse_optimizer("muon:lr=0.02,adamw_lr=0.003")
    assert spec.cls is fo.Muon and spec.kwargs == {"lr": 0.02, "adamw_lr": 0.003}


def test_trainer_mlp_on_digits_reaches_97_percent():
    """``Trainer(model, fo.Muon)`` (as ``--optimizer muon:...``) builds the recipe over the
    model's ParamSet: Muon on the hidden weights, AdamW on the rest."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    model = fo.MLP(64, [64, 64], 10, seed=0)
    model.fit_standardizer(Xtr)
    trainer = fo.Trainer(
        model,
        fo.Muon,
        lr=0.02,
        optimizer_kwargs={"adamw_lr": 1e-2},
        batch_size=64,
        epochs=12,
        seed=0,
        progress=False,
    )
    groups = trainer.optimizer.param_groups
    assert len(groups) == 1 and groups[0]["muon_params"] == ("layers.1.weight",)
    trainer.fit(Xtr, ytr)
    accuracy = float(np.mean(model.predict(Xte).argmax(axis=1) == yte))
    assert accuracy >= 0.97, accuracy


def test_zero_shards_muon_on_whole_matrices():
    """ZeRO-1 gives each rank whole tensors (a matrix's update needs all of it) and checks
    Muon's settings over the whole ParamSet (one process: MPI's COMM_WORLD of size 1)."""
    pytest.importorskip("mpi4py")
    from fastopt.distributed import ZeroRedundancyOptimizer

    assert fo.Muon.elementwise is False
    ps = fo.ParamSet({"w": np.zeros((4, 4)), "b": np.zeros(4)})
    zero = ZeroRedundancyOptimizer(ps, fo.Muon, muon_params=("w",))
    assert zero.tensors == ("w", "b") and zero.param_groups[0]["muon_params"] == ("w",)
    with pytest.raises(ValueError, match="parameter 'b' has shape"):
        ZeroRedundancyOptimizer(ps, fo.Muon)


def test_an_empty_matrix_is_left_alone():
    """A matrix with a zero dimension has nothing to update: the others step as without it (it
    divided by zero in the learning rate's aspect ratio after the first matrix was written)."""
    rng = np.random.default_rng(0)
    a, c = rng.standard_normal((6, 4)), rng.standard_normal((4, 5))
    ga, gc = rng.standard_normal((6, 4)), rng.standard_normal((4, 5))
    with_empty = [a.copy(), np.zeros((4, 0)), c.copy()]
    without = [a.copy(), c.copy()]
    o1 = fo.Muon(with_empty, lr=0.02, ns_dtype="float64")
    o2 = fo.Muon(without, lr=0.02, ns_dtype="float64")
    for _ in range(2):
        o1.step([ga, np.zeros((4, 0)), gc])
        o2.step([ga, gc])
    assert np.array_equal(with_empty[0], without[0]) and np.array_equal(with_empty[2], without[1])
