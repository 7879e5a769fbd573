"""fastopt.torch: copies and pickles of optimizers, torch's ways of resetting and loading state
(``opt.state.clear()``, state_dicts of older torch releases and of ``torch.optim.Muon``), and
refusals that name the parameter (found by an audit with reproducers, 2026-12-02)."""

import copy
import pickle

import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt.torch as fot  # noqa: E402


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def same(ma, mb):
    return all(torch.equal(a, b) for a, b in zip(ma.parameters(), mb.parameters()))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("offload", [False, True])
def test_a_copied_optimizer_steps_as_the_original(how, offload):
    model = mlp()
    opt = (
        fot.CPUOffload(fot.AdamW, model.parameters(), lr=1e-2)
        if offload
        else fot.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    )
    train(model, opt, 5)
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert type(opt2) is type(opt)
    assert same(model, model2)
    train(model, opt, 5, seed=2)
    train(model2, opt2, 5, seed=2)
    assert same(model, model2)  # the same state went along: the same bits
    p, p2 = next(model.parameters()), next(model2.parameters())
    assert p.data_ptr() != p2.data_ptr()  # buffers of its own


def test_clearing_the_state_restarts_the_moments_as_in_torch():
    mf, mt = mlp(), mlp()
    of, ot = fot.Adam(mf.parameters(), lr=1e-2), torch.optim.Adam(mt.parameters(), lr=1e-2)
    train(mf, of, 5)
    train(mt, ot, 5)
    of.state.clear()
    ot.state.clear()
    train(mf, of, 3, seed=3)
    train(mt, ot, 3, seed=3)
    assert max((a - b).abs().max().item() for a, b in zip(mf.parameters(), mt.parameters())) < 1e-6
    sd = of.state_dict()["state"]
    assert len(sd) == 4 and all(float(e["step"]) == 3 for e in sd.values())
    of.state = {}  # replaced (as a defaultdict by torch users): the same restart
    train(mf, of, 1, seed=4)
    assert all(float(e["step"]) == 1 for e in of.state_dict()["state"].values())


@pytest.mark.parametrize(
    "name,key", [("Adam", "decoupled_weight_decay"), ("RMSprop", "centered"), ("SGD", "maximize")]
)
def test_a_state_of_an_older_torch_without_newer_keys_loads(name, key):
    mt, mf = mlp(), mlp()
    ot = getattr(torch.optim, name)(mt.parameters(), lr=1e-2)
    train(mt, ot, 3)
    sd = copy.deepcopy(ot.state_dict())
    del sd["param_groups"][0][key]  # as an older torch release wrote it
    of = getattr(fot, name)(mf.parameters(), lr=1e-2)
    mf.load_state_dict(mt.state_dict())
    of.load_state_dict(sd)
    assert of.param_groups[0][key] is False
    train(mt, ot, 3, seed=2)
    train(mf, of, 3, seed=2)
    assert max((a - b).abs().max().item() for a, b in zip(mf.parameters(), mt.parameters())) < 1e-6


def test_a_torch_muon_state_loads_into_fastopt_muon():
    weights = [torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(s)))
               for s in range(2)]  # fmt: skip
    ot = torch.optim.Muon([weights[0]], lr=0.02)
    weights[0].grad = torch.randn(8, 6)
    ot.step()
    of = fot.Muon([weights[1]], lr=0.02)
    of.load_state_dict(copy.deepcopy(ot.state_dict()))  # lacks fastopt's own keys: its values
    assert torch.equal(
        of.state[weights[1]]["momentum_buffer"], ot.state[weights[0]]["momentum_buffer"]
    )
    assert of.param_groups[0]["ns_dtype"] == of.defaults["ns_dtype"]


def test_cpu_offload_refuses_a_parameter_unfrozen_after_construction():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = fot.CPUOffload(fot.SGD, [a, b], lr=0.1)
    b.requires_grad_(True)
    (a.sum() + b.sum()).backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\[1\] has a gradient but had"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3))  # nothing stepped


def _adam_state(model):
    opt = fot.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    return opt


def test_loads_that_do_not_fit_name_the_parameter_and_change_nothing():
    model = mlp()
    opt = _adam_state(model)
    before = copy.deepcopy(opt.state_dict())
    cases = [
        ("exp_avg", lambda e: e["exp_avg"].t(), r"'exp_avg' of param_groups\[0\]\[0\] has shape"),
        ("step", lambda e: torch.tensor(float("nan")), r"'step' of param_groups\[0\]\[0\] is nan"),
    ]
    for key, change, message in cases:
        bad = copy.deepcopy(before)
        bad["state"][0][key] = change(bad["state"][0])
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    del bad["state"][2]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"the state of param_groups\[0\]\[2\] holds"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for i, entry in before["state"].items():
        for k, v in entry.items():
            assert torch.equal(after["state"][i][k], v), (i, k)


def test_8bit_codes_without_their_absmax_are_refused():
    p = torch.nn.Parameter(torch.randn(4096))
    opt = fot.AdamW([p], lr=1e-2, state_dtype="int8")
    p.grad = torch.randn(4096)
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    del bad["state"][0]["exp_avg_absmax"]
    with pytest.raises(ValueError, match="8-bit codes without 'exp_avg_absmax'"):
        opt.load_state_dict(bad)
