"""fastopt.torch: the cases an audit found broken (zero-element parameters, CPUOffload's
add_param_group and param-group keys, parameters sharing memory, flatten_ without its result)."""

import copy
import gc
import weakref

import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt.torch as fot  # noqa: E402
from fastopt.torch import flat  # noqa: E402


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def loss_of(model, x):
    return model(x).pow(2).mean()


def test_zero_element_parameter_steps_as_in_torch():
    """torch reports data_ptr() 0 for a tensor without elements: the buffer must expect that."""

    def params():
        return [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(0, 4))]

    pf, pt = params(), params()
    of, ot = fot.Adam(pf, lr=0.1), torch.optim.Adam(pt, lr=0.1)
    for _ in range(3):
        for ps, o in ((pf, of), (pt, ot)):
            for p in ps:
                p.grad = torch.ones_like(p)
            o.step()
    assert torch.equal(pf[0], pt[0]) and pf[1].shape == (0, 4)
    of.load_state_dict(copy.deepcopy(ot.state_dict()))  # its (empty) state loads both ways
    ot.load_state_dict(copy.deepcopy(of.state_dict()))


def test_cpu_offload_add_param_group_trains_the_group_as_the_inner_optimizer():
    def build(cls, *args):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        opt = cls(*args, a.parameters(), lr=0.1, momentum=0.9)
        opt.add_param_group({"params": list(b.parameters()), "lr": 0.05})
        return a, b, opt

    (a1, b1, plain), (a2, b2, off) = build(fot.SGD), build(fot.CPUOffload, fot.SGD)
    before = b2.weight.detach().clone()
    for _ in range(3):
        x = torch.randn(3, 4)
        for a, b, o in ((a1, b1, plain), (a2, b2, off)):
            o.zero_grad()
            b(a(x)).pow(2).sum().backward()
            o.step()
    assert not torch.equal(b2.weight, before)
    for p, q in zip([*a1.parameters(), *b1.parameters()], [*a2.parameters(), *b2.parameters()]):
        assert torch.equal(p, q)
    assert len(off.inner.param_groups) == 2 and len(off.state_dict()["state"]) == 4
    with pytest.raises(ValueError, match="lr"):  # refused before anything changes
        off.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(off.param_groups) == len(off.inner.param_groups) == 2 and len(off.masters) == 4


def test_cpu_offload_state_dict_keeps_every_param_group_key():
    """LR schedulers' keys (initial_lr, max_lr, ...) round-trip, as with torch.optim."""
    m = mlp()
    off = fot.CPUOffload(fot.AdamW, m.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(off, max_lr=0.1, total_steps=10)
    loss_of(m, torch.randn(3, 6)).backward()
    off.step()
    sched.step()
    sd = copy.deepcopy(off.state_dict())
    saved = sd["param_groups"][0]
    assert set(saved) == set(off.param_groups[0]) and saved["max_lr"] == 0.1
    mt = mlp()
    t = torch.optim.AdamW(mt.parameters(), lr=0.01)
    st = torch.optim.lr_scheduler.OneCycleLR(t, max_lr=0.1, total_steps=10)
    t.load_state_dict(sd)
    loss_of(mt, torch.randn(3, 6)).backward()
    t.step()
    st.step()  # torch's scheduler finds its keys
    t.param_groups[0]["max_lr"] = 0.2  # and back into a fresh CPUOffload
    off2 = fot.CPUOffload(fot.AdamW, mlp().parameters(), lr=0.01)
    off2.load_state_dict(copy.deepcopy(t.state_dict()))
    assert off2.param_groups[0]["max_lr"] == 0.2 and "initial_lr" in off2.param_groups[0]
    assert off2.param_groups[0]["lr"] == t.param_groups[0]["lr"]


def test_parameters_sharing_memory_are_refused_by_name_tied_ones_work():
    def build(tie):
        torch.manual_seed(0)
        enc, dec = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
        if tie:
            dec.weight = enc.weight
        else:
            dec.weight.data = enc.weight.data
        return enc, dec

    for make in (
        lambda ps: fot.SGD(ps, lr=0.1),
        lambda ps: fot.SGD([{"params": [p]} for p in ps], lr=0.1),  # across groups
        fot.flatten_,
        lambda ps: fot.CPUOffload(fot.SGD, ps, lr=0.1),
    ):
        enc, dec = build(tie=False)
        before = enc.weight.detach().clone()
        with pytest.raises(ValueError, match=r"\[0\].* and .*\[1\].* share memory"):
            make([enc.weight, dec.weight])
        assert enc.weight.data_ptr() == dec.weight.data_ptr()  # still tied, untouched
        assert torch.equal(enc.weight, before)
    enc, dec = build(tie=True)  # one Parameter: one slot, stays tied
    opt = fot.SGD(torch.nn.ModuleList([enc, dec]).parameters(), lr=0.1)
    dec(enc(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    assert dec.weight is enc.weight
    off = fot.CPUOffload(fot.SGD, [torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        shared = off.param_groups[0]["params"][0]
        off.add_param_group({"params": [torch.nn.Parameter(shared.detach()[:1])]})
    assert len(off.param_groups) == len(off.inner.param_groups) == 1


def test_flatten_without_keeping_the_result_is_adopted_and_freed_with_the_model():
    model = mlp()
    fot.flatten_(model)
    gc.collect()
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = fot.AdamW(model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # adopted, not copied again
    loss_of(model, torch.randn(2, 6)).backward()
    opt.step()
    buf = opt._buckets[0][1]
    key = (str(buf.device), buf.flat.untyped_storage().data_ptr())
    assert key in flat._BUFFERS
    param, grad = weakref.ref(model[0].weight), weakref.ref(buf.grad)
    del model, opt, buf
    gc.collect()
    assert param() is None and grad() is None and key not in flat._BUFFERS


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        fot.Nope  # noqa: B018
