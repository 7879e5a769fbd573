"""fastopt.torch adapters of the rules whose state is not one value per element: Adafactor (row
and column factors, against torch.optim.Adafactor) and NovoGrad (one second moment per tensor,
against the fastopt core over the same arrays). Their state keeps flat buffers of its own, each
parameter's share back to back (``fastopt.torch.optimizer.StateLayout``)."""

import copy

import ml_dtypes
import numpy as np
import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt as fo  # noqa: E402
import fastopt.torch as fot  # noqa: E402

SHAPES = [(4, 5, 6), (7, 3), (3,), (), (2, 1, 4)]  # 3-D, a matrix, a vector, a scalar


def params(dtype=torch.float64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def set_grads(ps, step, skip=()):
    """A gradient per parameter for ``step`` (the same for every copy of the parameters); the
    parameters whose index is in ``skip`` get None, as autograd leaves an unused one."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(ps):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (0.5 + i)
        p.grad = None if i in skip else (g + 0.1 * p.detach().double()).to(p.dtype)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_adafactor_matches_torch_on_3d_matrix_vector_and_scalar_parameters():
    pf, pt = params(), params()
    kw = {"lr": 1e-2, "weight_decay": 1e-3, "maximize": False}
    of, ot = fot.Adafactor(pf, **kw), torch.optim.Adafactor(pt, **kw)
    for step in range(120):
        for ps, opt in ((pf, of), (pt, ot)):
            set_grads(ps, step, skip=(3,) if step % 7 == 3 else ())  # the scalar skips some
            opt.step()
        if step == 60:  # state_dicts exchanged both ways mid-run
            a, b = copy.deepcopy(of.state_dict()), copy.deepcopy(ot.state_dict())
            of.load_state_dict(b)
            ot.load_state_dict(a)
    assert max_diff(pf, pt) < 1e-10
    sf, st = of.state_dict(), ot.state_dict()
    assert set(sf["state"]) == set(st["state"]) == set(range(len(SHAPES)))
    for i, entry in st["state"].items():
        assert set(sf["state"][i]) == set(entry), i  # torch's keys: row_var/col_var or variance
        for k, v in entry.items():
            assert sf["state"][i][k].shape == v.shape, (i, k)
            assert torch.allclose(sf["state"][i][k].double(), v.double(), rtol=1e-9, atol=0), (i, k)
    assert sf["state"][0]["row_var"].shape == (4, 5, 1)
    assert sf["state"][0]["col_var"].shape == (4, 1, 6)
    assert float(sf["state"][3]["step"]) < float(sf["state"][2]["step"])  # skipped steps


def test_adafactor_state_is_published_as_views_of_its_own_flat_buffers():
    ps = params(torch.float32)
    opt = fot.Adafactor(ps)
    set_grads(ps, 0)
    opt.step()
    ((_, buf),) = opt._buckets
    rows = opt._tensors[0]["row_var"]
    assert rows.numel() == 4 * 5 + 7 + 2 * 1  # m rows per matrix, batch by batch
    assert opt._tensors[0]["variance"].numel() == 3 + 1
    state = opt.state[ps[1]]
    assert state["row_var"].data_ptr() == rows[4 * 5 :].data_ptr()  # the matrix after the 3-D one
    set_grads(ps, 1)
    before = state["col_var"].clone()
    opt.step()
    assert not torch.equal(before, opt.state[ps[1]]["col_var"])  # live views, not copies


def test_adafactor_refuses_a_state_of_other_shapes_before_anything_changes():
    pf, pt = params(torch.float32), params(torch.float32)
    of, ot = fot.Adafactor(pf), torch.optim.Adafactor(pt)
    for ps, opt in ((pf, of), (pt, ot)):
        set_grads(ps, 0)
        opt.step()
    bad = copy.deepcopy(ot.state_dict())
    bad["state"][1]["row_var"] = bad["state"][1]["row_var"].reshape(1, 7)  # (7, 1) expected
    before = copy.deepcopy(of.state_dict())
    values = [p.detach().clone() for p in pf]
    with pytest.raises(ValueError, match=r"row_var.*shape \(1, 7\), expected \(7, 1\)"):
        of.load_state_dict(bad)
    after = of.state_dict()
    for i, entry in before["state"].items():
        for k, v in entry.items():
            assert torch.equal(after["state"][i][k], v), (i, k)
    assert all(torch.equal(a, b) for a, b in zip(values, pf))
    bad = copy.deepcopy(ot.state_dict())
    bad["state"][2]["row_var"] = torch.zeros(3, 1)  # a vector keeps no factors
    with pytest.raises(ValueError, match="row_var"):
        of.load_state_dict(bad)


def test_adafactor_16bit_parameters_with_master_weights_equal_the_core():
    shapes = [(6, 5), (5,)]
    pf = params(torch.bfloat16, shapes=shapes)
    arrays = [p.detach().float().numpy().astype(ml_dtypes.bfloat16) for p in pf]
    kw = {"lr": 1e-2, "master_weights": True}
    of, core = fot.Adafactor(pf, **kw), fo.Adafactor(arrays, **kw)
    for step in range(20):
        set_grads(pf, step)
        grads = [p.grad.float().numpy().astype(ml_dtypes.bfloat16) for p in pf]
        of.step()
        core.step(grads)
    for p, a in zip(pf, arrays):
        assert np.array_equal(p.detach().view(torch.int16).numpy(), a.view(np.int16))


def test_cpu_offload_of_adafactor_is_the_plain_optimizer():
    pa, pb = params(torch.float32), params(torch.float32)
    plain, offload = fot.Adafactor(pa, lr=1e-2), fot.CPUOffload(fot.Adafactor, pb, lr=1e-2)
    for step in range(15):
        for ps, opt in ((pa, plain), (pb, offload)):
            set_grads(ps, step)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_novograd_equals_the_core_over_the_same_arrays(state_dtype):
    shapes = [(80, 64), (64,), (5, 3), ()]  # the first has 8-bit state with "int8"
    pf = params(torch.float32, shapes=shapes)
    arrays = [p.detach().numpy().copy() for p in pf]
    kw = {"lr": 1e-2, "weight_decay": 1e-3, "state_dtype": state_dtype}
    of, core = fot.NovoGrad(pf, **kw), fo.NovoGrad(arrays, **kw)
    for step in range(25):
        set_grads(pf, step)
        of.step()
        core.step([p.grad.numpy() for p in pf])
        if step == 12:  # a round trip through state_dict changes nothing
            of.load_state_dict(copy.deepcopy(of.state_dict()))
    for p, a in zip(pf, arrays):
        assert np.array_equal(p.detach().numpy(), a)
    sd = of.state_dict()["state"]
    for i, unit in enumerate(core.units()):
        assert sd[i]["exp_avg_sq"].shape == ()  # one value per tensor
        assert float(sd[i]["exp_avg_sq"]) == float(unit.state["exp_avg_sq"][0])
