"""fastopt.torch on bfloat16 models: against torch.optim.AdamW(fused=True), with every storage
precision option against the fastopt core, state_dicts exchanged with torch, CPU offload.

torch's fused CPU AdamW loads 16-bit values into float32, computes and rounds once per store, as
fastopt's storage loops do; on the model here the two agree bit for bit for 100 steps, states
included. They need not everywhere: torch's vectorised kernel computes the first moment's lerp as
one fused multiply-add, the rule as two roundings (``tests/test_precision.py`` measures a handful
of elements a few ulps apart over 32769-element tensors). float16 is not compared: with gradients
this small the float16 second moment underflows to 0 (in both), and a one-ulp difference in a
subnormal first moment then moves the parameter by ``lr * m / eps``, so the trajectories part.
"""

import copy

import numpy as np
import pytest
from oracle import torch_or_skip

import fastopt as fo
from fastopt.arrays import torch_numpy

torch = torch_or_skip()
import fastopt.torch as fot  # noqa: E402

pytestmark = pytest.mark.usefixtures("serial_kernels")

BF16 = torch.bfloat16


def mlp(dtype=BF16):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        dtype
    )


def bits(t):
    return t.detach().view(torch.int16).clone()


def train(pairs, steps, after_step=None, seed=1):
    """Train every (model, optimizer) on the same batches (loss: mean square of the output)."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x = torch.randn(8, 16, generator=gen).to(BF16)
        for m, o in pairs:
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            o.step()
        if after_step is not None:
            after_step(t)


def assert_same_bits(m1, m2):
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert a.dtype == b.dtype == BF16
        assert torch.equal(bits(a), bits(b))


@pytest.mark.oracle
def test_bf16_model_matches_torch_fused_bit_for_bit():
    mt, mf = mlp(), mlp()
    ot = torch.optim.AdamW(mt.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    of = fot.AdamW(mf.parameters(), lr=1e-2, weight_decay=0.1)
    train(((mt, ot), (mf, of)), 100)
    assert_same_bits(mt, mf)
    sd = of.state_dict()["state"]
    for i, p in enumerate(mt.parameters()):
        for name in ("exp_avg", "exp_avg_sq"):
            assert sd[i][name].dtype == BF16  # torch keeps bf16 state for bf16 params; so do we
            assert torch.equal(bits(sd[i][name]), bits(ot.state[p][name]))
        assert int(sd[i]["step"]) == 100


@pytest.mark.oracle
def test_bf16_state_dict_exchange_with_torch_both_ways():
    """Mid-run, each side continues from the other's state: still bit for bit with an
    uninterrupted torch run."""
    ref, mt, mf = mlp(), mlp(), mlp()
    oref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    ot = torch.optim.AdamW(mt.parameters(), lr=1e-2, fused=True)
    of = fot.AdamW(mf.parameters(), lr=1e-2)

    def swap(t):
        if t == 29:
            a, b = copy.deepcopy(of.state_dict()), copy.deepcopy(ot.state_dict())
            of.load_state_dict(b)
            ot.load_state_dict(a)
            # torch takes a group's flags from the loaded state_dict, and fastopt's has no
            # "fused": torch would continue on its bf16-arithmetic single-tensor path.
            ot.param_groups[0]["fused"] = True
            assert ot.state[next(mt.parameters())]["exp_avg"].dtype == BF16

    train(((ref, oref), (mt, ot), (mf, of)), 60, after_step=swap)
    assert_same_bits(ref, mt)
    assert_same_bits(ref, mf)


OPTIONS = [
    dict(master_weights=True, stochastic_rounding=True, seed=7),
    dict(state_dtype="float32"),
    dict(state_dtype="bfloat16", stochastic_rounding=True, seed=3),
]


@pytest.mark.parametrize("options", OPTIONS, ids=["master-sr", "state-f32", "state-bf16-sr"])
def test_precision_options_match_the_fastopt_core(options):
    """The adapter over a bf16 model and the fastopt core over bf16 NumPy copies of its
    parameters, fed the same gradients: same bits, parameters and state (stochastic rounding
    draws by the element's index within the optimizer's parameters, the same in both)."""
    m = mlp()
    of = fot.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **options)
    arrs = [np.array(torch_numpy(p.detach())) for p in m.parameters()]
    core = fo.AdamW(arrs, lr=1e-2, weight_decay=0.1, **options)

    def core_step(t):
        core.step([np.array(torch_numpy(p.grad)) for p in m.parameters()])

    train(((m, of),), 5, after_step=core_step)
    sd = of.state_dict()["state"]
    for i, (p, a) in enumerate(zip(m.parameters(), arrs)):
        assert np.array_equal(torch_numpy(p.detach()).view(np.uint16), a.view(np.uint16))
        assert set(sd[i]) == set(core.state[i])
        for name, v in core.state[i].items():
            if name == "step":
                assert int(sd[i][name]) == v
                continue
            got = torch_numpy(sd[i][name].reshape(-1))
            assert got.dtype == v.dtype
            assert np.array_equal(got.view(np.uint8), v.view(np.uint8))


def test_master_weights_in_the_state_dict():
    """``master_param`` (``fastopt.optim.precision.MASTER``): the float32 copy, in the state_dict
    and restored by load_state_dict exactly (through torch's loader, which would round it to
    the parameter's bf16); a torch state without it starts the copy from the bf16 parameter."""
    m1 = mlp()
    o1 = fot.AdamW(m1.parameters(), lr=1e-2, master_weights=True)
    train(((m1, o1),), 3)
    sd = copy.deepcopy(o1.state_dict())
    master = sd["state"][0]["master_param"]
    assert master.dtype == torch.float32 and master.shape == m1[0].weight.shape
    assert torch.equal(master.to(BF16), m1[0].weight.detach())
    assert not torch.equal(master, m1[0].weight.detach().float())  # more bits than the param

    m2 = copy.deepcopy(m1)
    o2 = fot.AdamW(m2.parameters(), lr=1e-2, master_weights=True)
    o2.load_state_dict(sd)
    assert torch.equal(o2.state_dict()["state"][0]["master_param"], master)
    train(((m1, o1), (m2, o2)), 3, seed=2)
    assert_same_bits(m1, m2)

    mt = mlp()
    ot = torch.optim.AdamW(mt.parameters(), lr=1e-2, fused=True)
    train(((mt, ot),), 3)
    m3 = copy.deepcopy(mt)
    o3 = fot.AdamW(m3.parameters(), lr=1e-2, master_weights=True)
    o3.load_state_dict(copy.deepcopy(ot.state_dict()))
    st = o3.state_dict()["state"][0]
    assert torch.equal(st["master_param"], m3[0].weight.detach().float())
    assert torch.equal(st["exp_avg"], ot.state[mt[0].weight]["exp_avg"].float())


def test_cpu_offload_of_a_bf16_model_equals_master_weights():
    """CPUOffload keeps float32 masters and float32 state for bf16 (stand-in device)
    parameters: the same arithmetic as ``master_weights=True``, so the same bits."""
    ma, mb = mlp(), mlp()
    plain = fot.AdamW(ma.parameters(), lr=1e-2, weight_decay=0.1, master_weights=True)
    off = fot.CPUOffload(fot.AdamW, mb.parameters(), lr=1e-2, weight_decay=0.1)
    assert all(m.dtype == torch.float32 for m in off.masters)
    train(((ma, plain), (mb, off)), 10)
    assert_same_bits(ma, mb)
    sd = plain.state_dict()["state"]
    for i, m in enumerate(off.masters):
        assert torch.equal(m.detach(), sd[i]["master_param"])


def test_cpu_offload_state_dict_carries_the_masters():
    """A CPUOffload state of a bf16 model holds each master as ``master_param``, the format of
    ``master_weights=True``: it restores the masters exactly and loads into the plain optimizer
    (and back); a state without masters (torch's) takes them from the device parameters."""
    ma, mb = mlp(), mlp()
    off = fot.CPUOffload(fot.AdamW, ma.parameters(), lr=1e-2)
    train(((ma, off),), 3)
    sd = copy.deepcopy(off.state_dict())
    assert all(torch.equal(sd["state"][i]["master_param"], m) for i, m in enumerate(off.masters))
    mb.load_state_dict(ma.state_dict())
    plain = fot.AdamW(mb.parameters(), lr=1e-2, master_weights=True)
    plain.load_state_dict(sd)
    mc = copy.deepcopy(ma)
    off2 = fot.CPUOffload(fot.AdamW, mc.parameters(), lr=1e-2)
    off2.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(off.masters, off2.masters))
    train(((ma, off), (mb, plain), (mc, off2)), 3, seed=2)
    assert_same_bits(ma, mb)
    assert_same_bits(ma, mc)

    mt = mlp()
    ot = torch.optim.AdamW(mt.parameters(), lr=1e-2, fused=True)
    train(((mt, ot),), 2)
    mo = mlp()
    off3 = fot.CPUOffload(fot.AdamW, mo.parameters(), lr=1e-2)
    with torch.no_grad():
        for p in mo.parameters():
            p.add_(1.0)  # the model's weights change after the optimizer was built
    off3.load_state_dict(copy.deepcopy(ot.state_dict()))
    for m, p in zip(off3.masters, mo.parameters()):
        assert torch.equal(m, p.detach().float())
    exp_avg = off3.inner.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, ot.state[next(mt.parameters())]["exp_avg"].float())


@pytest.mark.parametrize("name", ["AdamW", "LAMB", "Muon"])
def test_stochastic_rounding_of_a_parameter_does_not_depend_on_the_others_gradients(name):
    """Each element draws its random bits by its place in the optimizer's buffers: a parameter
    before it without a gradient (skipped, as torch) leaves its bits as they are. It shifted
    them when the step's core counted only the parameters that had gradients."""
    ends = []
    for drop_first in (False, True):
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(6, 5).to(torch.bfloat16)) for _ in range(2)]
        opt = getattr(fot, name)(ws, lr=1e-2, stochastic_rounding=True, seed=4)
        for t in range(3):
            gen = torch.Generator().manual_seed(t)
            for w in ws:
                w.grad = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
            if drop_first:
                ws[0].grad = None
            opt.step()
        ends.append(ws[1].detach().view(torch.int16).clone())
    assert torch.equal(ends[0], ends[1])
