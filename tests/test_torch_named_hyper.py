"""fastopt.torch: the hyperparameters that name parameters (LAMB/LARS/NovoGrad masks, Muon's
``muon_params``) see the names ``named_parameters()`` gives (or the parameters' indices in the
group), and Muon's choice is made over the whole group, whichever parameters have gradients
(before, the core's slice names "0", "1", ... reached the masks, and "hidden" was decided per run
of parameters with gradients)."""

import numpy as np
import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")

import fastopt as fo  # noqa: E402
import fastopt.torch as fot  # noqa: E402


def _model(seed=0, width=8, layers=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _backward(model, seed=1):
    torch.manual_seed(seed)
    model.zero_grad()
    model(torch.randn(4, model[0].in_features)).pow(2).sum().backward()


def _host(model):
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _grads(model):
    return {
        n: None if p.grad is None else p.grad.numpy().copy() for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("params", ["parameters", "named_parameters"])
def test_muon_hidden_is_chosen_over_the_whole_group(params):
    """One parameter without a gradient split the group into runs, and "hidden" (the 2-D
    parameters but the first and the last) was decided per run: 1.weight went to AdamW."""
    m = _model()
    host = _host(m)
    opt = fot.Muon(getattr(m, params)(), lr=0.02, muon_params="hidden")
    ref = fo.Muon(host, lr=0.02, muon_params="hidden")
    for k in range(3):
        _backward(m, seed=k)
        if k == 1:
            m[2].weight.grad = None
        opt.step()
        ref.step(_grads(m))
    for n, p in m.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), host[n], err_msg=n)


def test_muon_params_by_name_and_by_index():
    m, m2 = _model(), _model()
    host = _host(m)
    chosen = ("1.weight", "2.weight")
    opt = fot.Muon(m.named_parameters(), lr=0.02, muon_params=list(chosen))
    by_index = fot.Muon(m2.parameters(), lr=0.02, muon_params=[2, 4])  # their places in params
    ref = fo.Muon(host, lr=0.02, muon_params=list(chosen))
    for k in range(2):
        _backward(m, seed=k)
        _backward(m2, seed=k)
        opt.step()
        by_index.step()
        ref.step(_grads(m))
    for (n, p), p2 in zip(m.named_parameters(), m2.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), host[n], err_msg=n)
        np.testing.assert_array_equal(p2.detach().numpy(), host[n], err_msg=n)
    with pytest.raises(ValueError, match="not parameters of the group"):
        fot.Muon(_model().named_parameters(), muon_params=["0", "2"])


@pytest.mark.parametrize("shape", [(3,), (), (2, 3, 4)])
def test_muon_refuses_a_parameter_that_is_not_2d_when_built(shape):
    with pytest.raises(ValueError, match="2-D parameters only"):
        fot.Muon([torch.nn.Parameter(torch.ones(shape))])


@pytest.mark.parametrize("cls", ["LARS", "LAMB"])
def test_masks_see_the_parameters_names(cls):
    """The usual mask ``not name.endswith("bias")`` got "0", "1", ... and adapted and decayed
    the biases; now it sees named_parameters()'s names, as fastopt's core sees a dict's keys."""
    m = _model(layers=3)
    host = _host(m)
    seen = []

    def no_bias(name, shape):
        seen.append(name)
        return not name.endswith("bias")

    kw = {"weight_decay": 0.1, "weight_decay_mask": no_bias}
    if cls == "LARS":
        kw["trust_ratio_mask"] = no_bias
    opt = getattr(fot, cls)(m.named_parameters(), lr=0.05, **kw)
    ref = getattr(fo, cls)(host, lr=0.05, **kw)
    for k in range(3):
        _backward(m, seed=k)
        opt.step()
        ref.step(_grads(m))
    for n, p in m.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), host[n], err_msg=n)
    assert set(seen) == {n for n, _ in m.named_parameters()}
