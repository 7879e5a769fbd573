"""8-bit optimizer state through fastopt.torch (``state_dtype="int8"``): the adapter's flat buffer
steps as one unit with one block grid, so it equals the fastopt core over a ParamSet of the same
parameters bit for bit; state_dicts round-trip with fastopt's keys and a float state from
torch.optim is quantized on load; CPU offload keeps ~2.03 bytes of Adam state per parameter.
"""

import copy

import numpy as np
import pytest
from oracle import torch_or_skip

import fastopt as fo
from fastopt.optim import precision
from fastopt.paramset import ParamSet

torch = torch_or_skip()
import fastopt.torch as fot  # noqa: E402

pytestmark = pytest.mark.usefixtures("serial_kernels")

SHAPES = [(64, 64), (64,), (8, 64), (8,)]
"""4680 elements (above MIN_8BIT_SIZE); the bias, the second weight and its bias share blocks."""

CASES = [
    (fot.AdamW, fo.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (fot.SGD, fo.SGD, {"lr": 0.1, "momentum": 0.9}),
]


def params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def run(opt, ps, gs):
    for step in gs:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()


def flat(ps):
    return torch.cat([p.detach().reshape(-1) for p in ps]).numpy()


def same_bits(a, b):
    return np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize("adapter,core_class,kwargs", CASES, ids=["adamw", "sgd_momentum"])
def test_int8_state_equals_the_core_on_a_paramset(adapter, core_class, kwargs):
    ps, gs = params(), grads(3)
    buf = flat(ps).copy()
    paramset = ParamSet.from_buffers(
        buf, np.zeros_like(buf), [(str(i), s) for i, s in enumerate(SHAPES)]
    )
    core = core_class(paramset, state_dtype="int8", **kwargs)
    opt = adapter(ps, state_dtype="int8", **kwargs)
    for step in gs:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
        paramset.grad_flat[:] = flat(step)
        core.step()
    assert same_bits(flat(ps), buf)
    core_state = core.state_dict()["state"][0]
    for name, slot in opt._tensors[0].items():
        assert isinstance(slot, precision.Quantized)
        assert np.array_equal(slot.codes.numpy(), core_state[name].reshape(-1))
        assert same_bits(slot.absmax.numpy(), core_state[name + "_absmax"])


def test_state_dict_round_trip_with_fastopt_keys():
    ps, gs = params(), grads(4)
    opt = fot.AdamW(ps, lr=1e-2, weight_decay=0.1, state_dtype="int8")
    run(opt, ps, gs[:2])
    sd = copy.deepcopy(opt.state_dict())
    entry = sd["state"][1]  # the bias: 64 elements inside block 16, shared with its neighbours
    assert sorted(entry) == sorted(
        ["step"] + [f"{n}{s}" for n in ("exp_avg", "exp_avg_sq") for s in ("", "_absmax", "_qmap")]
    )
    assert entry["exp_avg"].dtype == torch.uint8 and entry["exp_avg"].shape == (64,)
    assert entry["exp_avg_absmax"].shape == (1,) and entry["exp_avg_qmap"] == "signed"
    assert entry["exp_avg_sq_qmap"] == "unsigned"
    assert sd["state"][0]["exp_avg_absmax"].shape == (16,)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = fot.AdamW(ps2, lr=1e-2, weight_decay=0.1, state_dtype="int8")
    opt2.load_state_dict(sd)
    run(opt, ps, gs[2:])
    run(opt2, ps2, gs[2:])
    assert same_bits(flat(ps), flat(ps2))


def test_torch_float_state_is_quantized_on_load():
    ps, gs = params(), grads(2)
    ref = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    run(ref, ps, gs[:1])
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = fot.AdamW(ps2, lr=1e-2, weight_decay=0.1, state_dtype="int8")
    opt.load_state_dict(ref.state_dict())
    for name in ("exp_avg", "exp_avg_sq"):
        slot = opt._tensors[0][name]
        host = precision.Quantized(slot.codes.numpy(), slot.absmax.numpy(), slot.signed)
        want = torch.cat([ref.state[p][name].reshape(-1) for p in ps]).numpy()
        assert np.allclose(host.dequantized(), want, rtol=0.05, atol=0.02 * np.abs(want).max())
        assert same_bits(host.absmax, precision.int8_from_values(want, slot.signed).absmax)
    run(ref, ps, gs[1:])
    run(opt, ps2, gs[1:])
    assert np.allclose(flat(ps2), flat(ps), atol=2e-3)


def test_block_layout_mismatch_is_refused_before_any_change():
    ps, gs = params(), grads(1)
    opt = fot.AdamW(ps, lr=1e-2, state_dtype="int8")
    run(opt, ps, gs)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg_absmax"] = sd["state"][1]["exp_avg_absmax"] * 2  # block 16 disagrees
    other = fot.AdamW(params(), lr=1e-2, state_dtype="int8")
    run(other, other.param_groups[0]["params"], gs)
    before = {k: v.codes.clone() for k, v in other._tensors[0].items()}
    with pytest.raises(ValueError, match="block 16, shared with the previous parameter"):
        other.load_state_dict(sd)
    assert all(torch.equal(other._tensors[0][k].codes, v) for k, v in before.items())


def test_bad_combinations_are_refused_by_name():
    with pytest.raises(ValueError, match="Rprop.*int8"):
        fot.Rprop(params(), state_dtype="int8")
    with pytest.raises(ValueError, match="SGD.*int8.*no state"):
        fot.SGD(params(), lr=0.1, state_dtype="int8")
    meta = [torch.nn.Parameter(torch.empty(4096, device="meta"))]
    with pytest.raises(TypeError, match="meta.*CPUOffload"):
        fot.AdamW(meta, state_dtype="int8")
    ps, gs = params(), grads(1)
    opt = fot.AdamW(ps, lr=1e-2, state_dtype="int8")
    run(opt, ps, gs)
    before = flat(ps).copy()
    ps[1].grad = None
    with pytest.raises(ValueError, match=r"param_groups\[0\]\[1\] have no gradient"):
        opt.step()
    assert same_bits(flat(ps), before)


def test_cpu_offload_int8_equals_the_plain_optimizer_and_holds_2_bytes_per_param():
    ps, gs = params(), grads(3)
    device_side = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    offload = fot.CPUOffload(fot.AdamW, device_side, lr=1e-2, state_dtype="int8")
    plain = fot.AdamW(ps, lr=1e-2, state_dtype="int8")
    run(offload, device_side, gs)
    run(plain, ps, gs)
    assert same_bits(flat(device_side), flat(ps))
    state_bytes = sum(
        t.nbytes if isinstance(t, torch.Tensor) else t.codes.nbytes + t.absmax.nbytes
        for tensors in offload.inner._tensors
        for t in tensors.values()
    )
    per_param = state_bytes / sum(p.numel() for p in ps)
    assert 2.0 <= per_param <= 2.04, per_param  # 2 codes + 2 absmax per 256: 2.03
    float_side = params()
    full = fot.CPUOffload(fot.AdamW, float_side, lr=1e-2)
    run(full, float_side, gs[:1])
    full_bytes = sum(t.nbytes for tensors in full.inner._tensors for t in tensors.values())
    assert full_bytes / state_bytes > 3.9


def test_bf16_master_weights_with_int8_state_equal_the_core_and_round_trip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ps = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params()]
    gs = [[g.to(torch.bfloat16) for g in step] for step in grads(3)]

    def bits(tensors):
        return torch.cat([t.detach().reshape(-1) for t in tensors]).view(torch.uint16).numpy()

    buf = bits(ps).copy().view(ml_dtypes.bfloat16)
    paramset = ParamSet.from_buffers(
        buf, np.zeros_like(buf), [(str(i), s) for i, s in enumerate(SHAPES)]
    )
    options = {"lr": 1e-2, "state_dtype": "int8", "master_weights": True}
    core = fo.AdamW(paramset, **options)
    opt = fot.AdamW(ps, **options)
    for step in gs[:2]:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
        paramset.grad_flat[:] = bits(step).view(ml_dtypes.bfloat16)
        core.step()
    assert np.array_equal(bits(ps), buf.view(np.uint16))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0][precision.MASTER].dtype == torch.float32
    assert sd["state"][0]["exp_avg_absmax"].dtype == torch.float32  # not rounded to bfloat16
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = fot.AdamW(ps2, **options)
    opt2.load_state_dict(sd)
    run(opt, ps, gs[2:])
    run(opt2, ps2, gs[2:])
    assert np.array_equal(bits(ps), bits(ps2))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_host_quantizer_gives_the_kernels_codes(signed):
    # int8_from_values (a float state loaded into 8-bit state) against block_loops.code_of on
    # random values, every midpoint of the map (ties) and its neighbours
    from fastopt.kernels import block_loops

    q = block_loops.qmap(signed)
    mids = ((q[:-1] + q[1:]) * np.float32(0.5)).astype(np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(500).astype(np.float32) * np.float32(1e-3),
            mids,
            np.nextafter(mids, np.float32(2)),
            np.nextafter(mids, np.float32(-2)),
            [1.0, 0.0, -0.0],
        ]
    ).astype(np.float32)
    x = np.abs(x) if not signed else x
    x[:: precision.QUANT_BLOCK] = 1.0  # absmax 1 in every block: the ties stay exact ties
    slot = precision.int8_from_values(x, signed)
    scale = np.repeat(slot.absmax, precision.QUANT_BLOCK)[: x.size]
    want = [block_loops.code_of(v / s, signed) for v, s in zip(x, scale)]
    assert np.array_equal(slot.codes, np.array(want, np.uint8))
    blocks = np.abs(np.pad(x, (0, slot.absmax.size * precision.QUANT_BLOCK - x.size)))
    assert same_bits(slot.absmax, blocks.reshape(-1, precision.QUANT_BLOCK).max(axis=1))
