"""Flat buffers: a model's parameters and gradients rebound to views of one parameter buffer and
one gradient buffer per (device, dtype), so that one kernel call updates them all.

``param.data = flat[lo:hi].view(shape)`` moves a parameter into the buffer (its values copied
once); the module keeps using the same ``nn.Parameter`` object. A gradient is attached as
``param.grad = grad_flat[lo:hi].view(shape)``: autograd's AccumulateGrad then adds every later
backward pass into that view in place (it only allocates a new ``.grad`` when the old one is
None), so after ``zero_grad(set_to_none=False)`` gradients land straight in ``grad_flat``.

``zero_grad(set_to_none=True)`` (torch's default) sets ``.grad`` to None, as torch does, and the
next backward gives each parameter it reaches a fresh tensor. :meth:`FlatBuffer.gather_grads`
copies those into the buffer at the next step, in one ``torch._foreach_copy_`` call after one
check per gradient, and attaches the views in their place (several backward passes before a
step accumulate in the fresh tensors, as in torch, and are copied once). A parameter that
backward did not reach keeps ``.grad = None`` and is skipped (no update, no weight decay, no state
change), as torch skips it. Measured alternative, not taken: a post-accumulate-grad hook copying
each fresh gradient during backward (it would free the fresh tensor sooner) costs a Python call
from the autograd engine per parameter per backward, about 10 µs, several times the copy here.

8-bit state (``state_dtype="int8"``) puts every parameter of at least ``MIN_8BIT_SIZE`` elements
in a buffer of its own kind, each starting at a multiple of 256 elements (``align``): each keeps
its 8-bit state in blocks of its own (the gaps between them hold zeros; see
:class:`fastopt.torch.FastoptOptimizer`).

What must be redone after the parameters move (``model.to(other device or dtype)``,
``model.cuda()``, ``model.half()``, an assignment to ``param.data``): the optimizer notices that a
parameter no longer lives at its place in the buffer and raises; build a new optimizer over the
moved parameters and load the old one's ``state_dict()``.
"""

import functools
import operator
import weakref

import numpy as np
import torch

from .. import arrays
from ..memory import aligned_zeros
from ..optim import precision
from ..paramset import ParamSet

_GRAD = operator.attrgetter("grad")
_THREADED_COPY = 1 << 15
"""Elements from which torch's CPU copy_ runs on several threads (its grain size, 32768)."""
_DATA_PTR = torch.Tensor.data_ptr

_BUFFERS = {}
"""(device, first byte of the storage) -> the :class:`_Packed` layout of the buffer that owns that
storage: an optimizer built over parameters :func:`flatten_` (or an earlier optimizer) already
packed adopts their buffer instead of copying again. An entry lives as long as its parameters do
(not as long as the FlatBuffer: ``flatten_(model)`` without keeping its result must still work)
and leaves when one of them is collected or is found moved out of its buffer."""


def describe_param(p, name):
    return f"parameter {name}" + f" ({tuple(p.shape)}, {p.dtype}, {p.device})"


def check_param(p, name):
    """TypeError for parameters fastopt cannot update: sparse and complex ones, non-tensors."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} is a {type(p).__name__}, not a torch tensor")
    if p.layout != torch.strided:
        raise TypeError(
            f"{describe_param(p, name)} is sparse ({p.layout}); fastopt.torch needs dense parameters"
        )
    if p.is_complex():
        raise TypeError(
            f"{describe_param(p, name)} is complex; fastopt.torch updates real floating-point "
            "parameters (view a complex parameter as real with torch.view_as_real)"
        )
    if not p.is_floating_point():
        raise TypeError(f"{describe_param(p, name)} is not floating point")


class FlatBuffer:
    """Parameters of one device and dtype packed in ``flat``, their gradients in ``grad``.

    ``params``: the tensors, in buffer order; ``names``: labels for errors; ``offsets``: their
    (start, stop) element ranges, each start a multiple of ``align`` (1: packed back to back; the
    gaps hold zeros, in ``flat`` and ``grad``); ``ptrs``: the address of each in ``flat``;
    ``grad_views``: the gradient views attached as ``.grad``;
    ``paramset``: a :class:`fastopt.ParamSet` adopting both buffers (no copy). Built by
    :meth:`pack`; :meth:`slice` gives a sub-range as a ParamSet for a kernel call over part.
    """

    def __init__(self, params, names, flat, grad, align=1):
        self.params = list(params)
        self.names = list(names)
        self.flat, self.grad = flat, grad
        self.align = align
        self.offsets = aligned_offsets(self.params, align)
        self.grad_views = [grad[a:b].view(p.shape) for p, (a, b) in zip(self.params, self.offsets)]
        self.ptrs = expected_ptrs(flat, self.offsets)
        self.device, self.dtype = flat.device, flat.dtype
        self.paramset = self.slice(0, len(self.params))
        self._all_present = (True,) * len(self.params)

    @classmethod
    def pack(cls, params, names, *, pin_memory=False, align=1):
        """A FlatBuffer over ``params`` (one device and dtype), each starting at a multiple of
        ``align`` elements: adopt the buffer they already are consecutive views of (from
        :func:`flatten_`, with the same ``align``), else copy them into a new buffer and rebind
        each ``param.data`` to its view. Gradients already present are copied in and attached."""
        adopted = _adopt(params, names, align)
        if adopted is not None:
            return adopted
        check_no_overlap(zip(names, params))
        p0 = params[0]
        offsets = aligned_offsets(params, align)
        n = offsets[-1][1]
        flat, grad = (
            allocate(n, p0.dtype, p0.device, pin_memory),
            allocate(n, p0.dtype, p0.device, pin_memory),
        )
        with torch.no_grad():
            for p, (lo, hi) in zip(params, offsets):
                flat[lo:hi].copy_(p.detach().reshape(-1))
                p.data = flat[lo:hi].view(p.shape)
        buf = cls(params, names, flat, grad, align)
        with torch.no_grad():
            for p, view in zip(params, buf.grad_views):
                if p.grad is not None:
                    view.copy_(p.grad)
                    p.grad = view
        _register(buf)
        return buf

    def slice(self, i, j):
        """A ParamSet adopting the buffers' range of params ``i .. j-1`` (no copy); the gaps
        between them are segments of their own (``"<k>+"``: after param ``k``)."""
        lo, hi = self.offsets[i][0], self.offsets[j - 1][1]
        segments = []
        for k in range(i, j):
            segments.append((str(k), tuple(self.params[k].shape)))
            gap = self.offsets[k + 1][0] - self.offsets[k][1] if k + 1 < j else 0
            if gap:
                segments.append((f"{k}+", (gap,)))
        return ParamSet.from_buffers(self.flat[lo:hi], self.grad[lo:hi], segments)

    def check_in_place(self):
        """RuntimeError naming the first parameter that no longer lives in the buffer."""
        if list(map(_DATA_PTR, self.params)) == self.ptrs:  # one C-level pass: the usual case
            return
        for p, ptr, name in zip(self.params, self.ptrs, self.names):
            if p.data_ptr() != ptr:
                raise RuntimeError(
                    f"{describe_param(p, name)} no longer lives in the optimizer's flat buffer "
                    "(model.to()/.cuda()/.half() or an assignment to .data moved it): build a new "
                    "optimizer over the moved parameters and load this one's state_dict()"
                )

    def gather_grads(self):
        """Which params have a gradient (a sequence of bools). Gradients that are not the buffer's
        views (assigned by hand, or left with a graph by ``create_graph=True``) are checked, all
        before the first write, then copied into ``grad`` in one pass, and the views attached."""
        if all(map(operator.is_, map(_GRAD, self.params), self.grad_views)):  # the usual case
            return self._all_present
        grads = list(map(_GRAD, self.params))
        fresh = [i for i, (g, v) in enumerate(zip(grads, self.grad_views)) if g is not v]
        present = [g is not None for g in grads]
        if fresh:
            self._copy_in([i for i in fresh if present[i]], grads)
        return present

    def _copy_in(self, indices, grads):
        # torch's .grad setter and autograd already guarantee the gradient's shape and device;
        # its dtype may differ only where a parameter's grad_dtype allows it
        for i in indices:
            p, g, name = self.params[i], grads[i], self.names[i]
            if g.layout is not torch.strided:
                raise TypeError(
                    f"the gradient of {describe_param(p, name)} is sparse ({g.layout}); "
                    "fastopt.torch needs dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            if g.dtype is not p.dtype or g.shape != p.shape:
                raise ValueError(
                    f"the gradient of {describe_param(p, name)} is {tuple(g.shape)}, {g.dtype}, "
                    f"{g.device}; it must match its parameter"
                )
        views = [self.grad_views[i] for i in indices]
        small = list(zip(views, indices))
        if self.device.type == "cpu":
            # Large gradients as single-threaded NumPy copies: torch's multithreaded copy_ right
            # after a Numba parallel step fights its idle workers for the cores (measured 2-3x
            # slower on the transformer shapes); torch copies small tensors on one thread anyway.
            small = []
            for view, i in zip(views, indices):
                if view.numel() < _THREADED_COPY:
                    small.append((view, i))
                else:
                    np.copyto(arrays.torch_numpy(view), arrays.torch_numpy(grads[i].detach()))
        if small:
            with torch.no_grad():
                torch._foreach_copy_([v for v, _ in small], [grads[i] for _, i in small])
        for i, view in zip(indices, views):
            self.params[i].grad = view

    def zero_grad(self, set_to_none):
        """torch's ``zero_grad``: gradients to None, or zeroed in place with one fill."""
        if set_to_none:
            for p in self.params:
                p.grad = None
        else:
            self.grad.zero_()
            for p, view in zip(self.params, self.grad_views):
                if p.grad is not None and p.grad is not view:
                    p.grad = None  # a stray tensor: zeroing the buffer view is the same value
                    p.grad = view


def check_no_overlap(named):
    """ValueError naming two distinct parameters of ``named`` (``(name, tensor)`` pairs, each
    tensor once) whose memory overlaps, e.g. tied through ``.data`` (``dec.weight.data =
    enc.weight.data``): packing would copy each into a slot of its own and untie them silently.
    (A Parameter listed twice is one parameter: pass it once.) Zero-element ones hold no memory."""
    spans = []
    for name, p in named:
        if p.numel():
            lo = p.data_ptr()
            hi = lo + p.element_size() * (1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride())))
            spans.append((str(p.device), lo, hi, name, p))
    spans.sort(key=operator.itemgetter(0, 1))
    for (dev_a, _, hi_a, name_a, a), (dev_b, lo_b, _, name_b, b) in zip(spans, spans[1:]):
        if dev_a == dev_b and lo_b < hi_a:
            raise ValueError(
                f"{describe_param(a, name_a)} and {describe_param(b, name_b)} share memory "
                "(tied through .data or views of one tensor): fastopt.torch would update them "
                "as separate tensors and untie them; tie them as one Parameter instead "
                "(dec.weight = enc.weight) and pass it once"
            )


def expected_ptrs(flat, offsets):
    """What ``data_ptr()`` gives for a view of each ``(start, stop)`` range of ``flat``: its
    address in the buffer, or 0 for an empty range (torch's ``data_ptr()`` of any tensor without
    elements), so that a zero-element parameter passes :meth:`FlatBuffer.check_in_place`."""
    base, size = flat.data_ptr(), flat.element_size()
    return [base + a * size if b > a else 0 for a, b in offsets]


def aligned_offsets(params, align):
    """[(start, stop)] of ``params`` packed in order, each start rounded up to a multiple of
    ``align`` elements."""
    out, lo = [], 0
    for p in params:
        lo = -(-lo // align) * align
        out.append((lo, lo + p.numel()))
        lo += p.numel()
    return out


def int8_layout(pairs):
    """``[(pairs, align)]``: how ``state_dtype="int8"`` packs ``(name, param)`` pairs of one
    device and dtype: the parameters of at least ``MIN_8BIT_SIZE`` elements (8-bit state) each
    starting on a block of ``QUANT_BLOCK`` elements, then the smaller ones (float32 state)
    back to back; empty kinds left out."""
    large = [(n, p) for n, p in pairs if p.numel() >= precision.MIN_8BIT_SIZE]
    small = [(n, p) for n, p in pairs if p.numel() < precision.MIN_8BIT_SIZE]
    return [(kind, align) for kind, align in ((large, precision.QUANT_BLOCK), (small, 1)) if kind]


def allocate(n, dtype, device, pin_memory):
    """A zeroed 1-D buffer of ``n`` elements of ``dtype`` (a torch or NumPy dtype): host
    buffers cache-line (and huge-page) aligned through ``fastopt.memory``, or pinned for copies
    to and from a GPU; device buffers from torch."""
    dtype = dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)
    if device.type == "cpu" and not pin_memory:
        if dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, viewed
            return torch.from_numpy(aligned_zeros(n, np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(aligned_zeros(n, torch.empty((), dtype=dtype).numpy().dtype))
    return torch.zeros(n, dtype=dtype, device=device, pin_memory=pin_memory)


def as_tensor(a, device):
    """The values of a backend array (NumPy, ``ml_dtypes.bfloat16`` included, or a CUDA array)
    as a torch tensor on ``device`` (zero-copy where it can be)."""
    if isinstance(a, np.ndarray):
        if arrays.storage_name(a.dtype) == "bfloat16":
            a = np.ascontiguousarray(a)
            return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16).to(device)
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return torch.as_tensor(a, device=device)


def torch_dtype(dtype):
    """The torch dtype of a NumPy dtype (``ml_dtypes.bfloat16`` -> ``torch.bfloat16``)."""
    return as_tensor(np.empty(0, dtype), "cpu").dtype


class _Packed:
    """What :func:`_adopt` needs of a packed FlatBuffer, without holding its parameters: weak
    references to them (``refs``; when one is collected the entry leaves ``_BUFFERS``, so the
    buffers of a model that is gone are freed), their ``offsets`` and expected ``ptrs``, and the
    buffers and gradient views, held here so that they outlive a FlatBuffer nobody kept."""

    def __init__(self, key, buf):
        forget = functools.partial(_forget, key, id(self))
        self.refs = [weakref.ref(p, forget) for p in buf.params]
        self.offsets, self.ptrs, self.align = buf.offsets, buf.ptrs, buf.align
        self.flat, self.grad, self.grad_views = buf.flat, buf.grad, buf.grad_views

    def in_place(self):
        """Whether every parameter is alive and still lives at its place in the buffer."""
        return [p.data_ptr() if p is not None else None for p in self.params()] == self.ptrs

    def params(self):
        return [r() for r in self.refs]


def _forget(key, entry_id, _ref):
    """Weak-reference callback: a parameter of entry ``entry_id`` was collected. (An id, not
    the entry: the entry holds this callback; and while the entry lives its id is its own.)"""
    if id(_BUFFERS.get(key)) == entry_id:
        del _BUFFERS[key]


def _register(buf):
    """Record ``buf``'s layout in ``_BUFFERS`` (after dropping entries whose parameters moved
    away, which can no longer be adopted and would keep their old buffers alive)."""
    for key, entry in list(_BUFFERS.items()):
        if not entry.in_place():
            del _BUFFERS[key]
    if buf.flat.numel():
        key = (str(buf.device), buf.flat.untyped_storage().data_ptr())
        _BUFFERS[key] = _Packed(key, buf)


def _adopt(params, names, align):
    """A FlatBuffer over the range of a packed buffer whose consecutive params are exactly
    ``params`` (still in place); None if they are not packed that way (``align`` included)."""
    p0 = params[0]
    key = (str(p0.device), p0.untyped_storage().data_ptr())
    entry = _BUFFERS.get(key)
    if entry is None or entry.flat.dtype != p0.dtype or entry.align != align:
        return None
    owned = entry.params()
    try:
        i = next(k for k, q in enumerate(owned) if q is p0)
    except StopIteration:
        return None
    j = i + len(params)
    if len(owned[i:j]) != len(params) or any(a is not b for a, b in zip(owned[i:j], params)):
        return None
    if list(map(_DATA_PTR, params)) != entry.ptrs[i:j]:  # moved: pack them anew
        del _BUFFERS[key]
        return None
    lo, hi = entry.offsets[i][0], entry.offsets[j - 1][1]
    buf = FlatBuffer(params, names, entry.flat[lo:hi], entry.grad[lo:hi], align)
    buf.grad_views = entry.grad_views[i:j]  # attached gradients stay attached
    return buf


def flatten_(model, *, pin_memory=False):
    """Rebind every trainable parameter of ``model`` (an ``nn.Module`` or an iterable of
    parameters) to a view of one flat buffer per (device, dtype), in place; returns the
    :class:`FlatBuffer` objects. A ``fastopt.torch`` optimizer built afterwards over the same
    parameters, in the same order, adopts these buffers without copying again (it flattens by
    itself otherwise), whether or not the result was kept: the buffers stay adoptable as long as
    the parameters live (``_BUFFERS``). Tied parameters (one Parameter) occupy one slot; distinct
    ones sharing memory are refused (:func:`check_no_overlap`); frozen ones
    (``requires_grad=False``) stay where they are."""
    return pack_trainable(model, pin_memory=pin_memory)


def pack_trainable(model, *, pin_memory=False, int8=False):
    """:func:`flatten_`; with ``int8``, in the layout of the optimizers with
    ``state_dtype="int8"`` (:func:`int8_layout`), so that they adopt the buffers
    (:class:`fastopt.torch.CPUOffload` packs its host masters so)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    groups, seen = {}, set()
    for i, p in enumerate(params):
        check_param(p, f"[{i}]")
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        groups.setdefault((str(p.device), p.dtype), []).append((f"[{i}]", p))
    check_no_overlap(item for items in groups.values() for item in items)
    kinds = [
        kind for items in groups.values() for kind in (int8_layout(items) if int8 else [(items, 1)])
    ]
    return [
        FlatBuffer.pack(
            [p for _, p in items], [n for n, _ in items], pin_memory=pin_memory, align=align
        )
        for items, align in kinds
    ]
