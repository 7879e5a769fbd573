"""fastopt.Adafactor: torch.optim.Adafactor semantics over the factored kernels of
kernels/factored.py.

- against torch.optim.Adafactor, float64 (1e-10) and float32 (1e-5), matrices, a 3-D tensor, a
  vector and a scalar, 100 steps; maximize, weight decay, eps1, d; the NumPy reference too;
- the state: m + n values per matrix, torch's shapes in state_dict (plain arrays), resume;
- the ParamSet path equals the list path bit for bit; 1 and 2 Numba threads give the same bits;
- clipping and the non-finite skip; bad input refused before any write;
- the registry: the Trainer reaches 97% on digits, the CLI runs it, checkpoints restore it.
"""

import hashlib
import pathlib
import sys

import numpy as np
import pytest
import thread_counts
from oracle import import_or_skip

import fastopt as fo
from fastopt.kernels import factored

torch = import_or_skip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"w": (30, 40), "t": (3, 5, 7), "b": (40,), "s": (), "e": (70, 300)}
TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _init(dtype):
    rng = np.random.default_rng(0)
    return {k: np.array(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


def _grads(t, dtype):
    rng = np.random.default_rng(100 + t)
    return {k: np.array(rng.standard_normal(s) * (1 + t % 3), dtype) for k, s in SHAPES.items()}


def run_fastopt(dtype, steps, kw=None, paramset=False, backend=None):
    init = _init(dtype)
    if paramset:
        ps = fo.ParamSet(init)
        opt = fo.Adafactor(ps, backend=backend, **(kw or {}))
        for t in range(steps):
            for k, g in _grads(t, dtype).items():
                ps.grads[k][...] = g
            opt.step()
        return {k: np.array(ps[k]) for k in SHAPES}, opt
    params = {k: v.copy() for k, v in init.items()}
    opt = fo.Adafactor(params, backend=backend, **(kw or {}))
    for t in range(steps):
        opt.step(_grads(t, dtype))
    return params, opt


def run_torch(dtype, steps, kw=None):
    params = {k: torch.tensor(v, requires_grad=True) for k, v in _init(dtype).items()}
    opt = torch.optim.Adafactor(list(params.values()), **(kw or {}))
    for t in range(steps):
        for k, g in _grads(t, dtype).items():
            params[k].grad = torch.tensor(g)
        opt.step()
    return {k: v.detach().numpy() for k, v in params.items()}, opt


def assert_close(got, want, rtol):
    for k in SHAPES:
        a, b = np.ravel(got[k]).astype(np.float64), np.ravel(want[k]).astype(np.float64)
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err <= rtol, (k, err)


CASES = {
    "defaults": {},
    "maximize_wd": {"lr": 0.05, "weight_decay": 0.1, "maximize": True},
    "eps_d": {"eps": (1e-6, 1e-2), "d": 2.0, "beta2_decay": -0.5},
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_100_steps(case, dtype):
    got, opt = run_fastopt(dtype, 100, CASES[case])
    want, topt = run_torch(dtype, 100, CASES[case])
    assert_close(got, want, TOL[dtype])
    # the factors too, in torch's shapes
    sd = opt.state_dict()["state"]
    for i, p in enumerate(topt.param_groups[0]["params"]):
        for name, v in topt.state[p].items():
            if name != "step":
                a = sd[i][name]
                assert a.shape == tuple(v.shape), (i, name)
                np.testing.assert_allclose(a, v.numpy(), rtol=100 * TOL[dtype], atol=1e-30)
        assert sd[i]["step"] == 100


def test_reference_backend_matches_torch():
    got, _ = run_fastopt(np.float64, 30, CASES["maximize_wd"], backend="numpy")
    want, _ = run_torch(np.float64, 30, CASES["maximize_wd"])
    assert_close(got, want, 1e-12)


def test_state_is_m_plus_n_per_matrix():
    ps = fo.ParamSet(_init(np.float32))
    opt = fo.Adafactor(ps)
    ps.grad_flat[...] = 1
    opt.step()
    st = opt.state[0]
    assert st["row_var"].size == 30 + 3 * 5 + 70
    assert st["col_var"].size == 40 + 3 * 7 + 300
    assert st["variance"].size == 40 + 1
    assert factored.state_sizes([(4, 0, 3), (5,), ()]) == (0, 12, 6)  # torch's shapes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paramset_path_equals_list_path(dtype):
    a, _ = run_fastopt(dtype, 5, CASES["maximize_wd"], paramset=True)
    b, _ = run_fastopt(dtype, 5, CASES["maximize_wd"])
    for k in SHAPES:
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("paramset", [False, True], ids=["list", "paramset"])
def test_state_dict_resumes_bit_for_bit(paramset):
    full, _ = run_fastopt(np.float64, 6, paramset=paramset)
    init = _init(np.float64)
    params = fo.ParamSet(init) if paramset else {k: v.copy() for k, v in init.items()}

    def step(opt, t):
        if paramset:
            for k, g in _grads(t, np.float64).items():
                params.grads[k][...] = g
            opt.step()
        else:
            opt.step(_grads(t, np.float64))

    opt = fo.Adafactor(params)
    for t in range(3):
        step(opt, t)
    sd = opt.state_dict()
    if paramset:
        assert sd["state"][0]["row_var"].shape == (30 + 15 + 70,)
    opt2 = fo.Adafactor(params)
    opt2.load_state_dict(sd)
    for t in range(3, 6):
        step(opt2, t)
    for k in SHAPES:
        assert np.array_equal(params[k], full[k]), k


def test_state_dict_with_wrong_factor_shape_is_refused():
    w = np.ones((4, 6))
    opt = fo.Adafactor([w])
    opt.step([np.ones((4, 6))])
    sd = opt.state_dict()
    assert sd["state"][0]["row_var"].shape == (4, 1)
    assert sd["state"][0]["col_var"].shape == (1, 6)
    assert sd["state"][0]["variance"].shape == (0,)
    sd["state"][0]["row_var"] = np.ones((6, 1))
    with pytest.raises(ValueError, match=r"'row_var'\] has shape \(6, 1\), expected \(4, 1\)"):
        fo.Adafactor([w]).load_state_dict(sd)


def test_checkpoint_round_trip(tmp_path):
    ps = fo.ParamSet(_init(np.float32))
    opt = fo.Adafactor(ps, eps=(None, 1e-3))
    ps.grad_flat[...] = 0.5
    opt.step()
    path = fo.save(tmp_path / "a.ckpt", params=ps, optimizer=opt)
    ps2 = fo.ParamSet(_init(np.float32))
    opt2 = fo.Adafactor(ps2)
    fo.load(path).restore(params=ps2, optimizer=opt2)
    assert opt2.param_groups[0]["eps"][0] is None
    for p, o in ((ps, opt), (ps2, opt2)):
        p.grad_flat[...] = 0.25
        o.step()
    assert ps.flat.tobytes() == ps2.flat.tobytes()


def test_grad_clipping_and_nonfinite_skip_follow_the_reference():
    kw = dict(max_grad_norm=1.0, max_grad_value=0.05, lr=0.03)
    a, _ = run_fastopt(np.float64, 4, kw)
    b, _ = run_fastopt(np.float64, 4, kw, backend="numpy")
    assert_close(a, b, 1e-13)
    w = np.ones((3, 4))
    opt = fo.Adafactor([w], skip_nonfinite=True)
    g = np.ones((3, 4))
    g[1, 2] = np.nan
    opt.step([g])
    assert opt.skipped_steps == 1 and not opt.last_step_taken
    assert np.all(w == 1) and opt.state == {}


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"eps": (None,)}, ValueError, "eps"),
        ({"eps": (-1e-3, 1e-3)}, ValueError, r"eps\[0\]"),
        ({"eps": (None, float("nan"))}, ValueError, r"eps\[1\]"),
        ({"eps": (None, "a")}, TypeError, r"eps\[1\]"),
        ({"d": 0.5}, ValueError, "d"),
        ({"d": float("inf")}, ValueError, "d"),
        ({"beta2_decay": 0.1}, ValueError, "beta2_decay"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"foreach": 1}, TypeError, "foreach"),
        ({"maximize": None}, TypeError, "maximize"),
    ],
)
def test_bad_hyperparameters_are_refused(kw, err, match):
    with pytest.raises(err, match=match):
        fo.Adafactor([np.zeros((2, 3))], **kw)


def test_bad_input_writes_nothing():
    w = np.ones((3, 4), np.float32)
    opt = fo.Adafactor([w])
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones((4, 3), np.float32)])
    opt.param_groups[0]["eps"] = (None, -1.0)
    with pytest.raises(ValueError, match=r"eps\[1\]"):
        opt.step([np.ones((3, 4), np.float32)])
    assert np.all(w == 1) and opt.state == {}
    with pytest.raises(TypeError, match="backend 'numpy' stores float32, float64"):
        fo.Adafactor([np.ones(3, np.float16)], backend="numpy")
    with pytest.raises(TypeError, match="integer|dtype"):
        opt.add_param_group({"params": [np.ones(3, np.int32)]})
    with pytest.raises(ValueError, match=r"cannot keep state_dtype='int8'.*m \+ n values"):
        fo.Adafactor([np.ones(3, np.float32)], state_dtype="int8")
    assert len(opt.param_groups) == 1  # the refused group is not kept


def test_gpu_backends_run_it_and_others_are_refused_by_name(monkeypatch):
    from fastopt.optim import adafactor

    opt = fo.Adafactor([np.ones((2, 2))])

    def unit(backend):
        return type(
            "Unit", (), {"label": "param [0]", "backend": type("B", (), {"name": backend})()}
        )

    opt._check_backend(unit("numba-cuda"))  # no longer refused
    assert adafactor.kernel_module("numba-cuda").__name__ == "fastopt.kernels.factored_cuda"
    with pytest.raises(
        RuntimeError,
        match="numba-cpu, numba-cuda, cupy and numpy backends; param \\[0\\] is on 'tpu'",
    ):
        opt._check_backend(unit("tpu"))
    monkeypatch.setitem(sys.modules, "fastopt.kernels.factored_cupy", None)  # as if missing
    with pytest.raises(
        RuntimeError,
        match="'cupy' backend \\(param \\[0\\]\\) needs fastopt.kernels.factored_cupy, which",
    ):
        opt._check_backend(unit("cupy"))


def test_registry_trainer_on_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    assert fo.optim.OPTIMIZERS["adafactor"] is fo.Adafactor
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    model = fo.MLP(64, (128,), 10, seed=0)
    trainer = fo.Trainer(
        model, fo.Adafactor, lr=1e-2, epochs=20, batch_size=32, progress=False, verbose=0, seed=0
    )
    trainer.fit((Xtr / 16).astype(np.float32), ytr)
    assert trainer.optimizer.state[0]["row_var"].size > 0  # factored over the model's matrices
    acc = np.mean(model.predict((Xte / 16).astype(np.float32)).argmax(1) == yte)
    assert acc >= 0.97, acc


def test_cli_trains_with_adafactor(tmp_path, capsys):
    from fastopt.cli import main

    out = tmp_path / "run"
    args = ["train", "digits", "--optimizer", "adafactor:lr=0.01,d=2", "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    ckpt = fo.checkpoint.load(out / "model.ckpt")
    assert ckpt.algorithm == "Adafactor"
    assert ckpt.optimizer_state["param_groups"][0]["d"] == 2


def child_digests():
    """Run in a child process: the bytes of a ParamSet after 3 Adafactor steps, several tiles
    per matrix and several pieces per vector."""
    sizes = {"a": (300, 600), "b": (40_000,), "c": (2, 70, 300), "d": (9,)}
    ps = fo.ParamSet({k: np.random.default_rng(1).standard_normal(s) for k, s in sizes.items()})
    opt = fo.Adafactor(ps, weight_decay=0.01)
    for t in range(3):
        ps.grad_flat[...] = np.random.default_rng(t).standard_normal(ps.size)
        opt.step()
    return {"adafactor": hashlib.sha256(ps.flat.tobytes()).hexdigest()}


def _digests(threads):
    return thread_counts.digests(__name__, threads)


def test_two_threads_give_the_bits_of_one():
    assert _digests(1) == _digests(2)
