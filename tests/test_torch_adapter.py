"""fastopt.torch: torch.optim-compatible optimizers over flat buffers, checked against torch.optim."""

import copy
import subprocess
import sys

import numpy as np
import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402
from fastopt.optim import OPTIMIZERS  # noqa: E402

TORCH_NAMES = [  # Muon takes matrices only, not this MLP's biases: tests/test_muon.py
    n
    for n, c in OPTIMIZERS.items()
    if hasattr(torch.optim, c.__name__)
    and not c.requires_closure
    and not getattr(c, "matrices_only", False)
]
SETTINGS = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    "rmsprop": {"lr": 1e-2, "momentum": 0.5, "centered": True},
    "adam": {"lr": 1e-2, "weight_decay": 1e-3},
    "adamw": {"lr": 1e-2},
    "adagrad": {"lr": 0.05},
    "adadelta": {"lr": 1.0},
    "adamax": {"lr": 1e-2},
    "nadam": {"lr": 1e-2},
    "radam": {"lr": 1e-2},
    "rprop": {"lr": 1e-3},
    "asgd": {"lr": 1e-2, "t0": 20.0},
    "adafactor": {"lr": 1e-2, "weight_decay": 1e-3},
}


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        dtype
    )


def loss_of(model, x):
    return model(x).pow(2).mean()


def train_pair(name, steps, swap_at=None, scheduler=None):
    """Train the same MLP with fastopt.torch.X and torch.optim.X; return the two models."""
    cls = fot.OPTIMIZER_CLASSES[name]
    mf, mt = mlp(), mlp()
    of = cls(mf.parameters(), **SETTINGS[name])
    ot = getattr(torch.optim, cls.__name__)(mt.parameters(), **SETTINGS[name])
    sf, st = (scheduler(of), scheduler(ot)) if scheduler else (None, None)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(8, 6, generator=gen)
        for m, o, s in ((mf, of, sf), (mt, ot, st)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
            if s is not None:
                s.step()
        if t == swap_at:
            a, b = copy.deepcopy(of.state_dict()), copy.deepcopy(ot.state_dict())
            of.load_state_dict(b)
            ot.load_state_dict(a)
    return mf, mt, of, ot


def max_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_matches_torch_200_steps_with_scheduler_and_state_swap(name):
    def sched(o):
        return torch.optim.lr_scheduler.StepLR(o, step_size=40, gamma=0.5)

    mf, mt, of, ot = train_pair(name, 200, swap_at=90, scheduler=sched)
    assert max_diff(mf, mt) < 1e-5
    assert of.param_groups[0]["lr"] == ot.param_groups[0]["lr"]
    sf, st = of.state_dict(), ot.state_dict()
    assert set(sf["state"]) == set(st["state"]) == {0, 1, 2, 3}
    for i in st["state"]:
        for k, v in st["state"][i].items():
            if isinstance(v, torch.Tensor) and k != "step":
                assert torch.allclose(sf["state"][i][k], v, atol=1e-5), (i, k)
            elif k == "step" and name != "sgd":  # torch.optim.SGD keeps no step of its own
                assert float(sf["state"][i][k]) == float(v)


def test_classes_come_from_the_registry():
    assert set(fot.OPTIMIZER_CLASSES) == {
        n for n, c in OPTIMIZERS.items() if not c.requires_closure
    }
    assert fot.LBFGS.core_class is OPTIMIZERS["lbfgs"]  # a closure optimizer: a class of its own
    assert fot.Adafactor.core_class.tensor_state  # its factors: flat buffers of their own
    for name, cls in fot.OPTIMIZER_CLASSES.items():
        assert issubclass(cls, torch.optim.Optimizer)
        assert cls.core_class is OPTIMIZERS[name]
        assert getattr(fot, cls.__name__) is cls
    p = torch.nn.Parameter(torch.zeros(3))
    assert fot.AdamW([p]).defaults["weight_decay"] == 1e-2  # fastopt's (torch's) default


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=60),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    ],
)
def test_schedulers_drive_it_unchanged(make):
    mf, mt, of, ot = train_pair("adam", 50, scheduler=make)
    assert max_diff(mf, mt) < 1e-5
    assert of.param_groups[0]["betas"] == ot.param_groups[0]["betas"]


def test_reduce_lr_on_plateau():
    model = mlp()
    opt = fot.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    x = torch.ones(2, 6)
    loss_of(model, x).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p, b - 0.025 * g)


def test_parameters_and_gradients_live_in_the_flat_buffers():
    model = mlp()
    opt = fot.Adam(model.parameters())
    ((_, buf),) = opt._buckets
    lo, hi = buf.flat.data_ptr(), buf.flat.data_ptr() + buf.flat.numel() * 4
    for p in model.parameters():
        assert lo <= p.data_ptr() < hi
    x = torch.randn(4, 6)
    loss_of(model, x).backward()
    opt.step()  # new .grad tensors are copied in and the views attached
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        assert buf.grad.data_ptr() <= p.grad.data_ptr() < buf.grad.data_ptr() + buf.grad.numel() * 4
    opt.zero_grad(set_to_none=False)
    assert float(buf.grad.abs().sum()) == 0.0
    loss_of(model, x).backward()  # AccumulateGrad adds into the views in place
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(buf.grad, ref) and float(ref.abs().sum()) > 0
    opt.zero_grad()  # torch's default: None
    assert all(p.grad is None for p in model.parameters())


def test_fresh_gradients_are_copied_in_one_pass(monkeypatch):
    """After ``zero_grad(set_to_none=True)`` backward leaves fresh tensors (two passes
    accumulate in them, as in torch); the step copies them into the flat buffer with one
    ``torch._foreach_copy_`` call, attaches the views, and updates with the sum."""
    model = mlp()
    opt = fot.SGD(model.parameters(), lr=0.1)
    ((_, buf),) = opt._buckets
    calls, real = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: calls.append(len(d)) or real(d, s))
    x = torch.randn(4, 6)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    loss_of(model, x).backward()
    loss_of(model, 2 * x).backward()
    sums = [p.grad.clone() for p in model.parameters()]
    assert not any(p.grad is v for p, v in zip(model.parameters(), buf.grad_views))
    opt.step()
    assert calls == [len(buf.params)]
    assert all(p.grad is v for p, v in zip(model.parameters(), buf.grad_views))
    for p, b, g in zip(model.parameters(), before, sums):
        assert torch.allclose(p, b - 0.1 * g)
    for dtype in (torch.float32, torch.bfloat16):  # large gradients: copied through NumPy
        big = torch.nn.Parameter(torch.ones(1 << 15, dtype=dtype))
        opt = fot.SGD([big], lr=0.5)
        big.grad = torch.arange(1 << 15).to(dtype)
        opt.step()
        assert torch.equal(big.detach(), 1 - 0.5 * torch.arange(1 << 15).to(dtype))
        assert big.grad is opt._buckets[0][1].grad_views[0]


def test_a_parameter_without_gradient_is_skipped_like_torch():
    def run(cls):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        opt = cls([*a.parameters(), *b.parameters()], lr=1e-2, weight_decay=0.1)
        gen = torch.Generator().manual_seed(2)
        for t in range(12):
            opt.zero_grad()
            x = torch.randn(3, 4, generator=gen)
            y = b(a(x)) if t % 3 == 0 else a(x)  # b gets gradients every third step only
            y.pow(2).sum().backward()
            if t == 4:
                frozen = [p.detach().clone() for p in b.parameters()]
                opt.step()
                assert all(torch.equal(p, f) for p, f in zip(b.parameters(), frozen))
            else:
                opt.step()
        return [p.detach() for p in (*a.parameters(), *b.parameters())], opt

    got, of = run(fot.AdamW)
    want, ot = run(torch.optim.AdamW)
    assert max((x - y).abs().max().item() for x, y in zip(got, want)) < 1e-6
    steps = [float(s["step"]) for s in of.state_dict()["state"].values()]
    assert steps == [float(s["step"]) for s in ot.state_dict()["state"].values()] == [12, 12, 4, 4]


def test_frozen_and_tied_parameters():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError, match="listed twice"):  # torch warns; see check_listed_once
        fot.SGD([emb.weight, head.weight, frozen], lr=0.1)
    opt = fot.SGD([emb.weight, frozen], lr=0.1)  # the tied weight listed once
    ((_, buf),) = opt._buckets
    assert len(buf.params) == 1 and buf.flat.numel() == 15
    assert frozen.data_ptr() != buf.flat.data_ptr()
    head(emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    assert torch.equal(frozen, torch.ones(2))
    frozen.grad = torch.ones(2)
    with pytest.raises(ValueError, match="requires_grad=False"):
        opt.step()


def test_named_parameters_param_groups_and_add_param_group():
    model = mlp()
    named = list(model.named_parameters())
    opt = fot.SGD(named[:2], lr=0.1)
    opt.add_param_group({"params": named[2:], "lr": 0.0})
    assert len(opt._buckets) == 2
    assert opt._buckets[1][1].names == ["2.weight", "2.bias"]
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, torch.ones(2, 6)).backward()
    opt.step()
    after = list(model.parameters())
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])  # lr 0


def test_flatten_then_optimizer_adopts_the_buffer():
    model = mlp()
    (buf,) = fot.flatten_(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = fot.Adam(model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert opt._buckets[0][1].flat.data_ptr() == buf.flat.data_ptr()


def test_model_to_is_detected():
    model = mlp()
    opt = fot.Adam(model.parameters())
    model.to(torch.float64)
    loss_of(model, torch.ones(1, 6, dtype=torch.float64)).backward()
    with pytest.raises(RuntimeError, match="load this one's state_dict"):
        opt.step()


def test_bad_input_is_refused_before_any_write():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = fot.Adam(emb.parameters())
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state_dict()["state"]
    with pytest.raises(TypeError, match="complex"):
        fot.SGD([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    cpu = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="mixes devices"):
        fot.SGD([cpu, meta])
    assert cpu.data_ptr() != 0 and cpu.grad is None
    with pytest.raises(ValueError, match="lr"):
        fot.Adam([cpu], lr=-1.0)
    with pytest.raises(TypeError, match="no_such_option"):
        fot.Adam([cpu], no_such_option=1)


def test_mismatched_state_dict_leaves_the_optimizer_unchanged():
    mf, _, of, _ = train_pair("adam", 3)
    sd_before = copy.deepcopy(of.state_dict())
    m = mlp()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    loss_of(m, torch.ones(1, 6)).backward()
    sgd.step()
    with pytest.raises(ValueError, match="does not fit"):
        of.load_state_dict(sgd.state_dict())
    after = of.state_dict()
    assert after["param_groups"][0]["lr"] == sd_before["param_groups"][0]["lr"]
    for i, entry in sd_before["state"].items():
        for k, v in entry.items():
            assert torch.equal(after["state"][i][k], v)
    wrong = copy.deepcopy(sd_before)
    wrong["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError):
        of.load_state_dict(wrong)


def test_options_reach_the_core():
    mf, mt = mlp(), mlp()
    of = fot.Adam(mf.parameters(), lr=1e-2, max_grad_norm=0.01)
    ot = torch.optim.Adam(mt.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(4, 6)
        for m, o in ((mf, of), (mt, ot)):
            o.zero_grad()
            loss_of(m, x).backward()
            if o is ot:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)
            o.step()
    assert max_diff(mf, mt) < 1e-6
    assert of.last_grad_norm > 0.01
    p = torch.nn.Parameter(torch.ones(2))
    opt = fot.SGD([p], lr=0.1, skip_nonfinite=True)
    p.grad = torch.tensor([1.0, float("nan")])
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p, torch.ones(2))
    _, options = fot.split_arguments(
        OPTIMIZERS["adamw"], (), {"state_dtype": "int8", "master_weights": True}
    )
    assert options == {"state_dtype": "int8", "master_weights": True}


@pytest.mark.parametrize("name", ["yogi", "lion"])
def test_algorithms_torch_lacks_match_the_fastopt_core(name):
    model = mlp()
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    opt = fot.OPTIMIZER_CLASSES[name](model.parameters(), lr=1e-2)
    core = OPTIMIZERS[name](arrays, lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        loss_of(model, torch.randn(4, 6)).backward()
        core.step([p.grad.numpy().copy() for p in model.parameters()])
        opt.step()
    for p, a in zip(model.parameters(), arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)


def test_cpu_offload_with_cpu_tensors_equals_the_plain_optimizer():
    ma, mb = mlp(), mlp()
    plain = fot.AdamW(ma.parameters(), lr=1e-2)
    off = fot.CPUOffload(fot.AdamW, mb.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(off, 3, 0.5)
    sched_a = torch.optim.lr_scheduler.StepLR(plain, 3, 0.5)
    for _ in range(8):
        x = torch.randn(4, 6)
        for m, o in ((ma, plain), (mb, off)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
        sched.step()
        sched_a.step()
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a, b)
    ref = torch.optim.AdamW(mlp().parameters(), lr=1e-2)
    ref.load_state_dict(copy.deepcopy(off.state_dict()))
    off.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert off.param_groups[0]["lr"] == plain.param_groups[0]["lr"]


def test_paramset_from_buffers_adopts():
    flat, grad = np.arange(6, dtype=np.float32), np.ones(6, np.float32)
    ps = fastopt.ParamSet.from_buffers(flat, grad, [("a", (2, 2)), ("b", (2,))])
    assert np.shares_memory(ps["a"], flat) and np.shares_memory(ps.grads["b"], grad)
    fastopt.SGD(ps, lr=0.5).step()
    np.testing.assert_array_equal(flat, np.arange(6) - 0.5)
    t = torch.zeros(4)
    ps = fastopt.ParamSet.from_buffers(t, torch.zeros(4), {"w": (4,)})
    ps["w"][...] = 2.0
    assert torch.equal(t, torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="cover"):
        fastopt.ParamSet.from_buffers(flat, grad, [("a", (5,))])
    with pytest.raises(ValueError, match="same dtype and size"):
        fastopt.ParamSet.from_buffers(flat, np.ones(5, np.float32), [("a", (6,))])
    with pytest.raises(TypeError, match="dtype"):
        fastopt.ParamSet.from_buffers(flat.astype(np.int32), grad.astype(np.int32), [("a", (6,))])


def test_import_fastopt_does_not_import_torch_and_missing_torch_is_named():
    code = "import sys, fastopt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    code = "import sys; sys.modules['torch'] = None\nimport fastopt.torch"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "pip install fastopt[torch]" in out.stderr


def test_step_hooks_and_the_profiler_range_still_run():
    # step() enters torch's wrapper (hooks, profiler range) only when one is registered or on:
    # both must then behave as with any torch optimizer
    model = mlp()
    opt = fot.AdamW(model.parameters(), lr=1e-2)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    glob = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("global"))
    try:
        loss_of(model, torch.ones(2, 6)).backward()
        assert opt.step(lambda: torch.tensor(3.0)).item() == 3.0
    finally:
        glob.remove()
    assert calls == ["pre", "post", "global"]
    pre.remove()
    post.remove()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autograd.profiler.profile() as prof:
        opt.step()
    assert "Optimizer.step#AdamW.step" in {e.name for e in prof.function_events}
    assert calls == ["pre", "post", "global"]  # removed hooks are not called
    assert torch.is_grad_enabled()  # the step's no_grad ends with it
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
