"""Fixes from an audit of how the optimizers fit together: add_param_group on an optimizer
built over plain parameters, the per-unit caches of the segment rules and Muon under a changing
lr, and core optimizers over torch tensors whose ``.data`` was replaced."""

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo


def _ps(seed, shapes=((4, 3), (5,))):
    rng = np.random.default_rng(seed)
    ps = fo.ParamSet({f"w{i}": rng.standard_normal(s) for i, s in enumerate(shapes)})
    ps.grad_flat[...] = rng.standard_normal(ps.size)
    return ps


@pytest.mark.parametrize("cls", [fo.SGD, fo.Adam, fo.LAMB, fo.LARS, fo.NovoGrad, fo.Adafactor])
def test_added_group_of_an_optimizer_over_plain_params_is_stepped(cls):
    """The group added to an optimizer built over a ParamSet (not group dicts) was never
    updated, silently; now both groups step, each from its own gradient buffer, as an
    optimizer built from the two group dicts steps them."""
    a, b = _ps(0), _ps(1)
    opt = cls(a, lr=0.01)
    opt.add_param_group({"params": b})
    ref_a, ref_b = _ps(0), _ps(1)
    ref = cls([{"params": ref_a}, {"params": ref_b}], lr=0.01)
    for _ in range(3):
        opt.step()
        ref.step()
    np.testing.assert_array_equal(a.flat, ref_a.flat)
    np.testing.assert_array_equal(b.flat, ref_b.flat)
    assert not np.array_equal(b.flat, _ps(1).flat)


def test_added_group_of_plain_arrays_takes_one_gradient_entry_per_group():
    w, v = np.ones(3), np.ones(2)
    opt = fo.SGD([w], lr=0.5)
    opt.add_param_group({"params": [v], "lr": 0.25})
    opt.step([[np.ones(3)], [np.ones(2)]])
    np.testing.assert_array_equal(w, 0.5)
    np.testing.assert_array_equal(v, 0.75)
    with pytest.raises(ValueError, match="2 param groups"):
        opt.step([np.ones(3)])


def test_muon_keeps_one_layout_per_unit_under_a_changing_lr():
    """Muon's layout was cached under every hyperparameter's value: a schedule left one
    entry behind per step (7.9 kB per step with 100 matrices)."""
    ps = _ps(2, shapes=((6, 4), (4, 4), (3,)))
    opt = fo.Muon(ps, lr=0.02, muon_params="hidden")
    for k in range(30):
        opt.param_groups[0]["lr"] = 0.02 / (1 + k)
        opt.step()
    layouts = [key for key in opt._muon_scratch if key[0] == "layout"]
    assert len(layouts) == 1


def test_muon_layout_follows_a_changed_selection():
    """The layout is rebuilt when muon_params changes (here from w0 alone to w0 and w1): the
    same result as an optimizer whose selection changed at the same step."""
    shapes = ((6, 4), (4, 4))
    ps, ref_ps = _ps(3, shapes), _ps(3, shapes)
    opt = fo.Muon(ps, lr=0.02, muon_params=["w0"])
    ref = fo.Muon(ref_ps, lr=0.02, muon_params=["w0"])
    opt.step()
    ref.step()
    opt.param_groups[0]["muon_params"] = ["w0", "w1"]
    ref.param_groups[0]["muon_params"] = ("w0", "w1")
    for _ in range(2):
        opt.step()
        ref.step()
    np.testing.assert_array_equal(ps.flat, ref_ps.flat)
    kept = _ps(3, shapes)
    stays = fo.Muon(kept, lr=0.02, muon_params=["w0"])
    for _ in range(3):
        stays.step()
    assert not np.array_equal(ps["w1"], kept["w1"])  # w1 went from AdamW to Muon


@pytest.mark.parametrize("cls", [fo.LAMB, fo.LARS, fo.NovoGrad])
def test_segment_rules_call_their_masks_once_under_a_changing_lr(cls):
    """The per-unit segment work (flags, layout, reduction buffers) was rebuilt, and the masks
    called again, at every step whose lr differed from the last one."""
    calls = []

    def mask(name, shape):
        calls.append(name)
        return True

    ps = _ps(4)
    kw = {"weight_decay_mask": mask} if cls is not fo.NovoGrad else {}
    if cls is fo.LARS:
        kw["trust_ratio_mask"] = mask
    opt = cls(ps, lr=0.1, **kw)
    buffers = set()
    for k in range(5):
        opt.param_groups[0]["lr"] = 0.1 / (1 + k)
        opt.step()
        buffers.add(id(opt._segment_cache[id(opt.units()[0])]["sums"]))
    assert len(buffers) == 1
    assert len(calls) == (0 if cls is fo.NovoGrad else len(ps.names) * len(kw))


def test_core_optimizer_refuses_a_torch_tensor_whose_data_was_replaced():
    """After ``t.data = ...`` (model.half(), model.to(dtype)) a core optimizer over ``t``
    updated the memory ``t`` no longer uses and reported success; now the step raises, before
    any write, as fastopt.torch does."""
    torch = import_or_skip("torch")
    t = torch.tensor([0.5, 3.0], dtype=torch.bfloat16)
    other = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    opt = fo.SGD([t, other], lr=0.5)
    g = np.ones(2, np.float32).astype(_bf16())
    opt.step([g, g])
    before = other.clone()
    t.data = t.data.to(torch.float16)
    with pytest.raises(RuntimeError, match="no longer uses the memory"):
        opt.step([np.ones(2, np.float16), g])
    assert torch.equal(other, before)  # nothing written, the other tensor included


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def test_muon_takes_ns_steps_zero_as_torch():
    """torch.optim.Muon takes ns_steps=0 (the update is the normalized momentum, no iteration);
    fastopt refused it (lower bound 1)."""
    torch = import_or_skip("torch")
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    tp = torch.nn.Parameter(w.clone())
    topt = torch.optim.Muon([tp], lr=0.02, ns_steps=0)
    a = w.numpy().copy()
    opt = fo.Muon([a], lr=0.02, ns_steps=0)
    for _ in range(5):
        g = torch.randn(6, 4)
        tp.grad = g.clone()
        topt.step()
        opt.step([g.numpy().copy()])
    np.testing.assert_allclose(a, tp.detach().numpy(), atol=1e-5)  # bfloat16 iteration
    with pytest.raises(ValueError, match="ns_steps"):
        fo.Muon([np.ones((2, 2))], ns_steps=-1)
