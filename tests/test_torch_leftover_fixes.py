"""fastopt.torch against torch.optim where an earlier audit left fastopt different: settings
that change which state a rule keeps (SGD momentum turned on or off mid-run, AMSGrad or
RMSprop's centered/momentum turned on), a parameter listed twice, ``opt.state`` edited the
ways torch users edit it (cleared, an entry cleared, replaced or a key deleted or assigned),
also through ``CPUOffload``. torch.optim is the oracle throughout."""

import collections
import copy

import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt.torch as fot  # noqa: E402

TOL = 1e-6


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train(model, opt, steps, seed=1, before_step=None, start=0):
    """``steps`` steps of the same data for any model; ``before_step(t, opt)`` runs after the
    backward pass of step ``t`` (counted from ``start``), as a scheduler or a user would."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(start, start + steps):
        x = torch.randn(4, 6, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if before_step is not None:
            before_step(t, opt)
        opt.step()


def gap(ma, mb):
    return max((a - b).abs().max().item() for a, b in zip(ma.parameters(), mb.parameters()))


def is_sgd(opt):
    return "SGD" in (type(opt).__name__, type(getattr(opt, "inner", None)).__name__)


def torch_state(opt, model):
    """{parameter index: {name: tensor}} of ``opt.state`` (torch's format), "step" left out for
    SGD (torch.optim.SGD keeps none; fastopt counts steps)."""
    out = {}
    for i, p in enumerate(model.parameters()):
        entry = opt.state.get(p)
        if entry:
            out[i] = {k: v for k, v in entry.items() if not (k == "step" and is_sgd(opt))}
    return out


def assert_same_state(sf, st):
    assert sf.keys() == st.keys()
    for i in sf:
        assert sf[i].keys() == st[i].keys(), (i, sorted(sf[i]), sorted(st[i]))
        for k in sf[i]:
            assert torch.allclose(sf[i][k].float(), st[i][k].float(), atol=TOL, rtol=1e-5), (i, k)


def setting_at(step, **values):
    def change(t, opt):
        if t == step:
            for g in opt.param_groups:
                g.update(values)

    return change


# ---------------------------------------------------------------- 1. state that settings change


@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=False)])
@pytest.mark.parametrize(
    "change",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, dampening=0.5),
        dict(momentum=0.8, nesterov=True, weight_decay=0.1),
    ],
    ids=["momentum", "dampening", "nesterov+weight_decay"],
)
def test_sgd_momentum_turned_on_mid_run_starts_a_buffer_as_torch(impl, change):
    mf, mt = mlp(), mlp()
    of = fot.SGD(mf.parameters(), lr=0.05)
    ot = torch.optim.SGD(mt.parameters(), lr=0.05, **impl)
    for m, o in ((mf, of), (mt, ot)):
        train(m, o, 6, before_step=setting_at(3, **change))
    assert gap(mf, mt) < TOL
    assert_same_state(torch_state(of, mf), torch_state(ot, mt))
    sd = of.state_dict()["state"]
    assert all("momentum_buffer" in e for e in sd.values())
    assert [float(e["step"]) for e in sd.values()] == [6.0] * 4  # the count goes on


def test_sgd_momentum_off_and_on_again_keeps_and_reuses_the_buffer_as_torch():
    mf, mt = mlp(), mlp()
    of = fot.SGD(mf.parameters(), lr=0.05, momentum=0.9, dampening=0.2)
    ot = torch.optim.SGD(mt.parameters(), lr=0.05, momentum=0.9, dampening=0.2, fused=True)
    for m, o in ((mf, of), (mt, ot)):
        train(m, o, 4, before_step=setting_at(2, momentum=0.0))
    assert gap(mf, mt) < TOL
    assert_same_state(torch_state(of, mf), torch_state(ot, mt))  # torch keeps the buffer
    # a state saved while momentum is off (fastopt's, and torch's) loads here, and steps on
    saved_f, saved_t = copy.deepcopy(of.state_dict()), copy.deepcopy(ot.state_dict())
    mg, mh = mlp(), mlp()
    mg.load_state_dict(mf.state_dict())
    mh.load_state_dict(mf.state_dict())
    og = fot.SGD(mg.parameters(), lr=0.05, momentum=0.9, dampening=0.2)
    oh = fot.SGD(mh.parameters(), lr=0.05, momentum=0.9, dampening=0.2)
    og.load_state_dict(saved_f)
    oh.load_state_dict(saved_t)
    ot2 = torch.optim.SGD(mlp().parameters(), lr=0.05, momentum=0.9)
    ot2.load_state_dict(copy.deepcopy(saved_f))  # and torch loads fastopt's
    turn_on = setting_at(5, momentum=0.9)
    for m, o in ((mf, of), (mt, ot), (mg, og), (mh, oh)):
        train(m, o, 4, seed=2, before_step=turn_on, start=4)
    assert gap(mf, mt) < TOL and gap(mg, mt) < TOL and gap(mh, mt) < TOL
    assert_same_state(torch_state(og, mg), torch_state(ot, mt))


def test_sgd_momentum_turned_on_reaches_a_parameter_without_gradient_at_its_next_step():
    torch.manual_seed(0)
    a, b = torch.randn(5), torch.randn(3)
    pf = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
    pt = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
    of = fot.SGD(pf, lr=0.1, dampening=0.3)
    # not fused=True: torch's fused SGD fails on a step where some buffers exist and some not
    ot = torch.optim.SGD(pt, lr=0.1, dampening=0.3, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for t in range(6):
        grads = [torch.randn(5, generator=gen), torch.randn(3, generator=gen)]
        for o, ps in ((of, pf), (ot, pt)):
            if t == 2:
                o.param_groups[0]["momentum"] = 0.9
            ps[0].grad = grads[0].clone()
            ps[1].grad = None if t in (2, 3) else grads[1].clone()  # b: no gradient at the switch
            o.step()
        for x, y in zip(pf, pt):
            assert (x - y).abs().max().item() < TOL, t
    assert torch.allclose(of.state[pf[1]]["momentum_buffer"], ot.state[pt[1]]["momentum_buffer"])


def test_sgd_momentum_turned_on_with_master_weights_keeps_the_master():
    """bfloat16 parameters with float32 masters: the buffer starts, the master is not reset
    from the rounded parameter (it equals a float32 run's parameters bit for bit)."""
    torch.manual_seed(0)
    init = [torch.randn(16, 8).bfloat16().float(), torch.randn(8).bfloat16().float()]
    p16 = [torch.nn.Parameter(x.bfloat16()) for x in init]
    p32 = [torch.nn.Parameter(x.clone()) for x in init]
    o16 = fot.SGD(p16, lr=0.05, master_weights=True)
    o32 = fot.SGD(p32, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        grads = [torch.randn(x.shape, generator=gen).bfloat16() for x in init]
        for o, ps in ((o16, p16), (o32, p32)):
            if t == 2:
                o.param_groups[0]["momentum"] = 0.9
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
            o.step()
    masters = [e["master_param"] for e in o16.state_dict()["state"].values()]
    assert all(torch.equal(m, p.detach()) for m, p in zip(masters, p32))


def test_sgd_momentum_turned_on_at_a_skipped_step_starts_at_the_next_taken_one():
    mf, mt = mlp(), mlp()
    of = fot.SGD(mf.parameters(), lr=0.05, skip_nonfinite=True, dampening=0.5)
    ot = torch.optim.SGD(mt.parameters(), lr=0.05, dampening=0.5, fused=True)
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        x = torch.randn(4, 6, generator=gen)
        for m, o in ((mf, of), (mt, ot)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            if t == 3:
                o.param_groups[0]["momentum"] = 0.9
                if o is ot:
                    continue  # torch has no skip_nonfinite: it does not step
                next(m.parameters()).grad[0, 0] = float("nan")
            o.step()
    assert of.skipped_steps == 1
    assert gap(mf, mt) < TOL
    assert_same_state(torch_state(of, mf), torch_state(ot, mt))


def block_absmax(t, block=256):
    flat = t.detach().abs().reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % block))
    return flat.reshape(-1, block).amax(1)


def test_sgd_buffer_deleted_with_8bit_state_starts_again_as_torch():
    """With ``state_dtype="int8"`` SGD needs momentum (no state to quantize without), so its
    buffer goes missing only when deleted: it starts again from the gradient, as in torch."""
    torch.manual_seed(0)
    ws = [torch.randn(4096 + 40), torch.randn(5000), torch.randn(7)]  # two 8-bit, one float
    pf = [torch.nn.Parameter(w.clone()) for w in ws]
    pt = [torch.nn.Parameter(w.clone()) for w in ws]
    of = fot.SGD(pf, lr=0.05, momentum=0.9, state_dtype="int8")
    ot = torch.optim.SGD(pt, lr=0.05, momentum=0.9, fused=True)
    gen = torch.Generator().manual_seed(1)
    for t in range(3):
        grads = [torch.randn(w.shape, generator=gen) for w in ws]
        before = [p.detach().clone() for p in pf]
        for o, ps in ((of, pf), (ot, pt)):
            if t == 2:
                for p in ps:
                    del o.state[p]["momentum_buffer"]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    for p, q, b, g in zip(pf, pt, before, grads):
        got, want = of.state[p], ot.state[q]["momentum_buffer"]
        assert torch.equal(want, g)  # torch: the buffer starts again as the gradient
        assert torch.allclose(b - p.detach(), 0.05 * g, atol=TOL)  # and steps with it
        if p.numel() >= 4096:  # 8-bit codes and the absmax of each block of the gradient
            assert got["momentum_buffer"].dtype == torch.uint8
            assert torch.equal(got["momentum_buffer_absmax"], block_absmax(want))
        else:
            assert torch.equal(got["momentum_buffer"], want)
            assert (p - q).abs().max().item() < TOL
        assert float(got["step"]) == 3


@pytest.mark.parametrize(
    "name,hyper,change,missing",
    [
        ("Adam", dict(), dict(amsgrad=True), "max_exp_avg_sq"),
        ("AdamW", dict(), dict(amsgrad=True), "max_exp_avg_sq"),
        ("RMSprop", dict(), dict(centered=True), "grad_avg"),
        ("RMSprop", dict(), dict(momentum=0.9), "momentum_buffer"),
    ],
)
def test_state_torch_makes_only_at_the_first_step_is_refused_before_any_write(
    name, hyper, change, missing
):
    mt, mf = mlp(), mlp()
    ot = getattr(torch.optim, name)(mt.parameters(), lr=0.01, **hyper)
    of = getattr(fot, name)(mf.named_parameters(), lr=0.01, **hyper)
    train(mt, ot, 2)
    train(mf, of, 2)
    for o in (ot, of):
        o.param_groups[0].update(change)
    with pytest.raises(KeyError, match=missing):  # torch.optim's answer
        train(mt, ot, 1, seed=2)
    before = [p.detach().clone() for p in mf.parameters()]
    state = copy.deepcopy(of.state_dict())
    with pytest.raises(ValueError, match=rf"{missing}.*0\.weight.*first step"):
        train(mf, of, 1, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(before, mf.parameters()))
    after = of.state_dict()
    assert all(
        torch.equal(v, after["state"][i][k])
        for i, e in state["state"].items()
        for k, v in e.items()
    )
    of.state.clear()  # the remedy the message names: restart, as in torch
    ot.state.clear()
    mt.load_state_dict(mf.state_dict())
    train(mt, ot, 3, seed=3)
    train(mf, of, 3, seed=3)
    assert gap(mf, mt) < TOL
    assert missing in of.state[next(mf.parameters())]


@pytest.mark.parametrize(
    "name,hyper,off,on",
    [
        ("Adam", dict(amsgrad=True), dict(amsgrad=False), dict(amsgrad=True)),
        ("RMSprop", dict(momentum=0.5, centered=True), dict(momentum=0.0, centered=False),
         dict(momentum=0.5, centered=True)),
    ],
)  # fmt: skip
def test_state_a_setting_stops_using_is_kept_saved_and_loaded_as_torch(name, hyper, off, on):
    mf, mt = mlp(), mlp()
    of = getattr(fot, name)(mf.parameters(), lr=0.01, **hyper)
    ot = getattr(torch.optim, name)(mt.parameters(), lr=0.01, **hyper)
    for m, o in ((mf, of), (mt, ot)):
        train(m, o, 4, before_step=setting_at(2, **off))
    assert_same_state(torch_state(of, mf), torch_state(ot, mt))
    mg = mlp()
    mg.load_state_dict(mt.state_dict())
    og = getattr(fot, name)(mg.parameters(), lr=0.01, **hyper)
    og.load_state_dict(copy.deepcopy(ot.state_dict()))  # torch's state with the unused arrays
    for m, o in ((mf, of), (mt, ot), (mg, og)):
        train(m, o, 3, seed=2, before_step=setting_at(5, **on), start=4)
    assert gap(mf, mt) < TOL and gap(mg, mt) < TOL


# ---------------------------------------------------------------- 2. a parameter listed twice


def test_a_parameter_listed_twice_is_refused_and_in_two_groups_as_torch_refuses_it():
    w, v = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="duplicate"):  # torch only warns, then steps it twice
        torch.optim.Adam([w, w])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\[2\] is listed twice"):
        fot.Adam([w, v, w])
    with pytest.raises(ValueError, match=r"again is listed twice.*as layer\.w"):
        fot.SGD([("layer.w", w), ("again", w)], lr=0.1)
    with pytest.raises(ValueError, match="listed twice"):
        fot.CPUOffload(fot.AdamW, [w, w], lr=0.1)
    for make in (
        lambda ps: torch.optim.Adam(ps),
        lambda ps: fot.Adam(ps),
        lambda ps: fot.CPUOffload(fot.Adam, ps),
    ):
        with pytest.raises(ValueError, match="more than one parameter group"):
            make([{"params": [w]}, {"params": [w, v]}])
    for opt in (fot.Adam([w], lr=0.1), fot.CPUOffload(fot.Adam, [w], lr=0.1)):
        for group in ({"params": [v, v]}, {"params": [v, w]}):
            with pytest.raises(ValueError, match="listed twice|more than one parameter group"):
                opt.add_param_group(group)
            assert len(opt.param_groups) == 1  # nothing added
        opt.add_param_group({"params": [v]})
        w.grad, v.grad = torch.ones(3), torch.ones(2)
        opt.step()
        assert len(opt.param_groups) == 2


# ---------------------------------------------------------------- 3. opt.state edited


def offload_pair(cls=fot.Adam, **kw):
    mf, mt, mp = mlp(), mlp(), mlp()
    return (
        (mf, fot.CPUOffload(cls, mf.parameters(), lr=1e-2, **kw)),
        (mt, getattr(torch.optim, cls.__name__)(mt.parameters(), lr=1e-2, **kw)),
        (mp, cls(mp.parameters(), lr=1e-2, **kw)),
    )


@pytest.mark.parametrize(
    "reset",
    [
        lambda opt, model: opt.state.clear(),
        lambda opt, model: opt.state.__delitem__(next(model.parameters())),
        lambda opt, model: opt.state[next(model.parameters())].clear(),
        lambda opt, model: opt.state.__setitem__(next(model.parameters()), {}),
        lambda opt, model: setattr(opt, "state", collections.defaultdict(dict)),
    ],
    ids=["clear", "del", "entry.clear", "entry={}", "state={}"],
)
def test_cpu_offload_state_resets_restart_the_moments_as_in_torch(reset):
    pairs = offload_pair()
    for m, o in pairs:
        train(m, o, 4)
        reset(o, m)
        train(m, o, 3, seed=2)
    (mf, of), (mt, ot), (mp, op) = pairs
    assert gap(mf, mt) < TOL and gap(mp, mt) < TOL
    assert gap(mf, mp) == 0  # the plain optimizer's bits
    assert_same_state(torch_state(of, mf), torch_state(ot, mt))
    steps_f = {i: float(e["step"]) for i, e in of.state_dict()["state"].items()}
    assert steps_f == {i: float(e["step"]) for i, e in ot.state_dict()["state"].items()}


def delete_key(key):
    return lambda opt, p: opt.state[p].__delitem__(key)


def assign(key, make):
    return lambda opt, p: opt.state[p].__setitem__(key, make(p))


@pytest.mark.parametrize(
    "name,hyper,edit",
    [
        ("Adam", {}, lambda opt, p: opt.state[p].clear()),
        ("Adam", {}, lambda opt, p: opt.state.__setitem__(p, {})),
        ("SGD", dict(momentum=0.9, dampening=0.5), lambda opt, p: opt.state[p].clear()),
        ("SGD", dict(momentum=0.9, dampening=0.5), delete_key("momentum_buffer")),
        ("SGD", dict(momentum=0.9), assign("momentum_buffer", lambda p: torch.full_like(p, 0.5))),
        (
            "SGD",
            dict(momentum=0.9),  # torch.optim.SGD ignores a "step": it is not a first step
            lambda opt, p: opt.state[p].update(
                momentum_buffer=torch.full_like(p, -0.5), step=torch.tensor(0.0)
            ),
        ),
        ("Adam", {}, assign("exp_avg", lambda p: torch.zeros_like(p))),
        ("Adam", {}, assign("step", lambda p: torch.tensor(0.0))),
        ("NAdam", {}, assign("mu_product", lambda p: torch.tensor(1.0))),
        ("Adam", {}, lambda opt, p: opt.state[p].update(step=torch.tensor(1.0))),
    ],
    ids=[
        "adam-entry.clear",
        "adam-entry={}",
        "sgd-entry.clear",
        "sgd-del-buffer",
        "sgd-set-buffer",
        "sgd-set-buffer-and-step",
        "adam-set-exp_avg",
        "adam-set-step",
        "nadam-set-mu_product",
        "adam-update-step",
    ],
)
def test_an_edited_state_entry_steps_as_in_torch(name, hyper, edit):
    mf, mt = mlp(), mlp()
    of = getattr(fot, name)(mf.parameters(), lr=1e-2, **hyper)
    ot = getattr(torch.optim, name)(mt.parameters(), lr=1e-2, foreach=False, **hyper)
    for m, o in ((mf, of), (mt, ot)):
        train(m, o, 4)
        edit(o, next(m.parameters()))
        train(m, o, 3, seed=2)
    assert gap(mf, mt) < TOL
    assert_same_state(torch_state(of, mf), torch_state(ot, mt))
    if name != "SGD":  # torch.optim.SGD keeps no step (a "step" given to it is ignored)
        st = ot.state_dict()["state"]
        for i, e in of.state_dict()["state"].items():
            assert float(e["step"]) == float(st[i]["step"])


@pytest.mark.parametrize("key", ["exp_avg", "step"])
def test_a_deleted_moment_is_refused_before_any_write_as_torch_fails(key):
    mt, mf = mlp(), mlp()
    ot = torch.optim.Adam(mt.parameters(), lr=1e-2)
    of = fot.Adam(mf.parameters(), lr=1e-2)
    train(mt, ot, 2)
    train(mf, of, 2)
    del ot.state[next(mt.parameters())][key]
    del of.state[next(mf.parameters())][key]
    with pytest.raises(KeyError):
        train(mt, ot, 1)
    before = [p.detach().clone() for p in mf.parameters()]
    for _ in range(2):  # every step, until repaired
        with pytest.raises(ValueError, match=r"opt\.state was edited.*Nothing was updated"):
            train(mf, of, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, mf.parameters()))
    del of.state[next(mf.parameters())]  # restart it, as torch would take it
    train(mf, of, 1)
    assert float(of.state[next(mf.parameters())]["step"]) == 1


def test_cpu_offload_refuses_parameters_on_two_devices():
    """One side stream on one device orders a step's copies; parameters of another device (two
    GPUs, or a GPU and the CPU) would be copied on that device's current stream, which the step
    never waits for. Refused by name before any host master is made (a meta tensor stands in
    for the second device here)."""
    here = torch.nn.Parameter(torch.ones(3))
    elsewhere = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"on \['cpu', 'meta'\]; one CPUOffload steps"):
        fot.CPUOffload(fot.AdamW, [here, elsewhere], lr=0.1)
    with pytest.raises(ValueError, match="use a CPUOffload per device"):
        fot.CPUOffload(fot.AdamW, [{"params": [here]}, {"params": [elsewhere]}], lr=0.1)
