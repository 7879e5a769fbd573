"""fastopt.torch as a drop-in for torch.optim: torch's implementation keywords (``foreach``,
``fused``, ``capturable``, ``differentiable``), a tensor ``lr``, and CPUOffload with named
parameters, ``last_grad_norm``, ``state`` and schedule-free ``train()`` / ``eval()``."""

import copy
import inspect

import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt.torch as fot  # noqa: E402
from fastopt.torch.dropin import TORCH_FLAGS  # noqa: E402

WITH_TORCH = sorted(
    name
    for name, cls in fot.OPTIMIZER_CLASSES.items()
    if cls.__name__ != "Muon"  # torch.optim.Muon: 2-D parameters only, none of the keywords
    and isinstance(getattr(torch.optim, cls.__name__, None), type)
)


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model.to(dtype)


def loss_of(model, x):
    return model(x.to(next(model.parameters()).dtype)).float().pow(2).mean()


def train(pairs, steps, seed=1, after_step=None):
    """``steps`` steps of each (model, optimizer) of ``pairs`` on the same batches."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen)
        for model, opt in pairs:
            opt.zero_grad()
            loss_of(model, x).backward()
            opt.step()
        if after_step is not None:
            after_step()


def max_diff(ma, mb):
    return max((a - b).abs().max().item() for a, b in zip(ma.parameters(), mb.parameters()))


def torch_keywords(cls):
    params = inspect.signature(getattr(torch.optim, cls.__name__)).parameters
    return {n: params[n].default for n in TORCH_FLAGS if n in params}


# ---------------------------------------------------------------- foreach / fused / ...
@pytest.mark.parametrize("name", WITH_TORCH)
def test_torch_implementation_keywords_are_accepted_as_torch_has_them(name):
    cls = fot.OPTIMIZER_CLASSES[name]
    flags = torch_keywords(cls)
    sig = inspect.signature(cls).parameters
    assert {n: sig[n].default for n in TORCH_FLAGS if n in sig} == flags
    for flag in ("foreach", "fused"):
        if flag not in flags:
            continue
        for value in (None, False, True):
            opt = cls(mlp().parameters(), **{flag: value})
            assert opt.defaults[flag] is value and opt.param_groups[0][flag] is value
    opt = cls(mlp().parameters())
    ref = getattr(torch.optim, cls.__name__)(mlp().parameters())
    assert set(ref.defaults) <= set(opt.defaults)  # torch's keys, with torch's defaults
    assert {k: opt.defaults[k] for k in flags} == {k: ref.defaults[k] for k in flags}


def test_keywords_torch_lacks_stay_unknown():
    with pytest.raises(TypeError, match="fused"):
        fot.Lion(mlp().parameters(), fused=True)  # no torch.optim.Lion
    with pytest.raises(TypeError, match="capturable"):
        fot.SGD(mlp().parameters(), capturable=False)  # torch.optim.SGD has none either


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_are_refused_before_any_write(flag):
    model = mlp()
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        fot.Adam(model.parameters(), **{flag: True})
    with pytest.raises(ValueError, match=f"param_groups\\[0\\]: {flag}=True"):
        fot.Adam([{"params": model.parameters(), flag: True}])
    with pytest.raises(ValueError, match=flag):
        fot.CPUOffload(fot.AdamW, model.parameters(), **{flag: True})
    opt = fot.Adam(list(model.parameters())[:2])
    with pytest.raises(ValueError, match=f"param_groups\\[1\\]: {flag}=True"):
        opt.add_param_group({"params": list(model.parameters())[2:], flag: True})
    assert len(opt.param_groups) == 1 and len(opt._buckets) == 1
    for (ptr, value), p in list(zip(before, model.parameters()))[2:]:
        assert p.data_ptr() == ptr and torch.equal(p, value)  # not moved into a buffer


def test_fused_and_foreach_together_are_refused_as_torch_refuses():
    with pytest.raises(RuntimeError):
        torch.optim.AdamW(mlp().parameters(), fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        fot.AdamW(mlp().parameters(), fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused must be None, False or True"):
        fot.AdamW(mlp().parameters(), fused="yes")


def test_state_dict_exchange_with_torch_fused_adamw_both_ways():
    """The two-line change: fastopt.torch.AdamW(..., fused=True) where torch.optim.AdamW(...,
    fused=True) was; the param groups have torch's keys and values, and a state moves both ways
    mid-run with training continuing as before (to rounding)."""
    mf, mt = mlp(), mlp()
    kw = dict(lr=1e-2, weight_decay=0.1, fused=True)
    of, ot = fot.AdamW(mf.parameters(), **kw), torch.optim.AdamW(mt.parameters(), **kw)
    train([(mf, of), (mt, ot)], 10)
    sf, st = of.state_dict(), ot.state_dict()
    assert sf["param_groups"] == st["param_groups"]
    of2, ot2 = fot.AdamW(mf.parameters(), lr=0.5), torch.optim.AdamW(mt.parameters(), lr=0.5)
    of2.load_state_dict(copy.deepcopy(st))  # torch's state into fastopt
    ot2.load_state_dict(copy.deepcopy(sf))  # fastopt's into torch: still fused, decoupled
    assert ot2.param_groups[0]["fused"] is True and of2.param_groups[0]["fused"] is True
    assert ot2.param_groups[0]["decoupled_weight_decay"] is True
    train([(mf, of2), (mt, ot2)], 10, seed=2)
    assert max_diff(mf, mt) < 1e-5


def test_a_state_dict_without_the_keywords_gets_torch_defaults():
    opt = fot.AdamW(mlp().parameters())
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for k in ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay"):
            del group[k]
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert group["fused"] is None and group["capturable"] is False
    assert group["decoupled_weight_decay"] is True


# ---------------------------------------------------------------- tensor lr
@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_tensor_lr_with_a_scheduler_matches_torch(name):
    cls = fot.OPTIMIZER_CLASSES[name]
    kw = {"momentum": 0.9} if name == "sgd" else {}
    mf, mt = mlp(), mlp()
    of = cls(mf.parameters(), lr=torch.tensor(0.01), **kw)
    ot = getattr(torch.optim, cls.__name__)(mt.parameters(), lr=torch.tensor(0.01), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 3, 0.5) for o in (of, ot)]
    train([(mf, of), (mt, ot)], 12, after_step=lambda: [s.step() for s in scheds])
    assert isinstance(of.param_groups[0]["lr"], torch.Tensor)
    assert of.param_groups[0]["lr"].item() == ot.param_groups[0]["lr"].item() < 0.01
    assert max_diff(mf, mt) < 1e-6


def test_tensor_lr_in_cpu_offload_follows_the_scheduler():
    ma, mb = mlp(), mlp()
    plain = fot.AdamW(ma.parameters(), lr=0.01)
    off = fot.CPUOffload(fot.AdamW, mb.parameters(), lr=torch.tensor(0.01))
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (plain, off)]
    train([(ma, plain), (mb, off)], 6, after_step=lambda: [s.step() for s in scheds])
    assert max_diff(ma, mb) < 1e-7


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("adamw", {"lr": torch.tensor([1e-3, 1e-3])}),
        ("sgd", {"lr": torch.ones(1, 2)}),
        ("adamw", {"lr": torch.tensor(1e-3), "foreach": True}),
        ("adam", {"lr": torch.tensor(1e-3), "foreach": True}),
        ("sgd", {"lr": torch.tensor(1e-3), "foreach": True}),
        ("nadam", {"lr": torch.tensor(1e-3), "foreach": True}),
        ("adamw", {"lr": torch.tensor([1e-3]), "fused": True}),
        ("adamw", {"lr": torch.tensor(-1e-3)}),
    ],
)
def test_tensor_lr_is_refused_where_torch_refuses_it(name, kwargs):
    cls = fot.OPTIMIZER_CLASSES[name]
    try:
        getattr(torch.optim, cls.__name__)(mlp().parameters(), **kwargs)
        torch_error = None
    except (ValueError, RuntimeError) as exc:
        torch_error = exc
    model = mlp()
    ptrs = [p.data_ptr() for p in model.parameters()]
    if torch_error is None:
        cls(model.parameters(), **kwargs)
        return
    with pytest.raises(ValueError, match="lr"):
        cls(model.parameters(), **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


# ---------------------------------------------------------------- CPUOffload
def test_cpu_offload_takes_named_parameters_like_the_plain_optimizer():
    ma, mb, mc = mlp(), mlp(), mlp()
    plain = fot.AdamW(ma.named_parameters(), lr=1e-2)
    off = fot.CPUOffload(fot.AdamW, mb.named_parameters(), lr=1e-2)
    named = list(mc.named_parameters())
    off_groups = fot.CPUOffload(
        fot.AdamW, [{"params": named[:2]}, {"params": named[2:], "lr": 1e-2}], lr=1e-2
    )
    train([(ma, plain), (mb, off), (mc, off_groups)], 5)
    assert max_diff(ma, mb) == 0 and max_diff(ma, mc) == 0
    names = [n for n, _ in ma.named_parameters()]
    assert off.state_dict()["param_groups"][0]["param_names"] == names
    assert off.inner._buckets[0][1].names == names
    with pytest.raises(ValueError, match="with or without names"):
        fot.CPUOffload(fot.AdamW, [named[0], named[1][1]])
    bad = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="the_bad_one"):
        fot.CPUOffload(fot.AdamW, [*mlp().named_parameters(), ("the_bad_one", bad)])


def test_cpu_offload_last_grad_norm_as_the_plain_optimizer():
    ma, mb = mlp(), mlp()
    plain = fot.AdamW(ma.parameters(), lr=1e-2, max_grad_norm=0.1)
    off = fot.CPUOffload(fot.AdamW, mb.parameters(), lr=1e-2, max_grad_norm=0.1)
    assert off.last_grad_norm is None and off.last_step_taken is None
    train([(ma, plain), (mb, off)], 3)
    assert off.last_grad_norm is not None and off.last_grad_norm == plain.last_grad_norm
    assert off.last_step_taken is True and max_diff(ma, mb) == 0


def test_cpu_offload_state_maps_each_parameter_to_its_inner_state():
    ma, mb = mlp(), mlp()
    plain = fot.AdamW(ma.parameters(), lr=1e-2)
    off = fot.CPUOffload(fot.AdamW, mb.parameters(), lr=1e-2)
    assert len(off.state) == 0 and off.state[next(mb.parameters())] == {}
    train([(ma, plain), (mb, off)], 3)
    assert list(off.state) == list(mb.parameters()) and len(off.state) == 4
    for pa, pb, m in zip(ma.parameters(), mb.parameters(), off.masters):
        assert pb in off.state and off.state[pb] is off.inner.state[m]
        for k, v in plain.state[pa].items():
            assert torch.equal(off.state[pb][k], v)
    with pytest.raises(KeyError):
        off.state[torch.nn.Parameter(torch.zeros(1))]


def test_cpu_offload_without_train_eval_when_the_inner_has_none():
    off = fot.CPUOffload(fot.AdamW, mlp().parameters())
    assert not hasattr(off, "train") and not hasattr(off, "eval")


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_cpu_offload_schedule_free_train_eval_move_the_model(name):
    cls = getattr(fot, name)
    ma, mb = mlp(), mlp()
    plain, off = cls(ma.parameters(), lr=1e-2), fot.CPUOffload(cls, mb.parameters(), lr=1e-2)
    assert isinstance(off, fot.CPUOffload) and off.train_mode
    train([(ma, plain), (mb, off)], 6)
    y = [p.detach().clone() for p in mb.parameters()]
    for o in (plain, off):
        o.eval()
    assert not off.train_mode and max_diff(ma, mb) == 0
    assert any(not torch.equal(a, b) for a, b in zip(y, mb.parameters()))  # x, not y
    grads = [m.grad.clone() for m in off.masters]
    loss_of(mb, torch.ones(2, 6)).backward()
    with pytest.raises(RuntimeError, match="eval mode"):
        off.step()
    assert max_diff(ma, mb) == 0  # nothing written: parameters, host gradients
    assert all(torch.equal(g, m.grad) for g, m in zip(grads, off.masters))
    for o in (plain, off):
        o.train()
    assert off.train_mode and max_diff(ma, mb) == 0
    train([(ma, plain), (mb, off)], 3)
    assert max_diff(ma, mb) == 0
    sd = off.state_dict()
    assert sd["train_mode"] is True


def test_cpu_offload_schedule_free_eval_rounds_16bit_parameters_as_a_step():
    mb = mlp(dtype=torch.bfloat16)
    off = fot.CPUOffload(fot.AdamWScheduleFree, mb.parameters(), lr=1e-2)
    train([(mb, off)], 5)
    off.eval()
    for p, m in zip(mb.parameters(), off.masters):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
    off.train()
    for p, m in zip(mb.parameters(), off.masters):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_tensor_betas_work_as_in_torch():
    """One-element tensor betas (torch accepts them without foreach=True): the same steps as
    torch.optim.Adam, a torch state_dict loads; torch's refusals refused by name."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w2 = torch.nn.Parameter(w.detach().clone())
    betas = (torch.tensor(0.8), torch.tensor(0.99))
    ours = fot.Adam([w], lr=0.1, betas=betas)
    theirs = torch.optim.Adam([w2], lr=0.1, betas=betas)
    for _ in range(3):
        g = torch.randn(5)
        w.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(w, w2, rtol=1e-6, atol=1e-7)
    ours.load_state_dict(theirs.state_dict())
    for bad, match in (
        (dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.9))), "one element"),
        (dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True), "foreach=True"),
        (dict(betas=(torch.tensor(0.9), 0.99)), "both floats or both tensors"),
    ):
        with pytest.raises(ValueError, match=match):
            fot.Adam([w], **bad)
