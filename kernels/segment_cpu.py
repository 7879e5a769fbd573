"""CPU launchers of the per-segment rules: the templates of ``kernels/segment_loops.py``
compiled with ``numba.njit`` per rule (on first use, cached on disk).

:func:`reduce` (launch 1: per-piece partial sums), :func:`segment` (launch 2: per-segment sums,
scalars and scalar state) and :func:`apply` (launch 3: the elementwise update) take the piece
layout of ``segment_loops.pieces``. Every result is identical for any thread count.
"""

import hashlib
import inspect
import pathlib

from numba import njit, prange

from . import cpu_math, rules, segment_loops
from .compile_rules import compile_rules, rebind, specialize

_TAG = hashlib.sha256(
    b"".join(
        (pathlib.Path(__file__).parent / f).read_bytes()
        for f in ("segment_loops.py", "cpu_math.py")
    )
).hexdigest()[:8]
PARALLEL_THRESHOLD = 1 << 15
"""Buffers with fewer elements run the serial loops."""

_RULES = None
_KERNELS = {}


def _add(a, b):
    return a + b


def _mul(a, b):
    return a * b


def _compiled():
    global _RULES
    if _RULES is None:
        inline = njit(inline="always", cache=True, error_model="numpy")
        compiled = compile_rules(inline, cpu_math.RULE_HELPERS)
        glb = {"np": segment_loops.np, "LANES": segment_loops.LANES}
        glb["STORED_BLOCK"] = segment_loops.STORED_BLOCK
        glb["TASK"] = segment_loops.TASK
        glb["CHUNK"] = segment_loops.REDUCTION_CHUNK
        glb["add"] = inline(rebind(_add, glb))
        glb["mul"] = inline(rebind(_mul, glb))
        glb["lane_tree"] = inline(rebind(segment_loops._lane_tree, glb, "lane_tree"))
        glb["lane_squares"] = inline(rebind(segment_loops._lane_squares, glb, "lane_squares"))
        glb["add_row"] = inline(rebind(segment_loops._add_row, glb, "add_row"))
        glb["square_add"] = cpu_math.square_add
        glb["skip_single"] = False
        _RULES = compiled, glb, inline
    return _RULES


def pre_arity(rule_name):
    """State slots of ``<rule>_pre``: ``pre(p, g, *state, h, flags)``."""
    return len(inspect.signature(getattr(rules, f"{rule_name}_pre")).parameters) - 4


def kernels(rule_name, parallel=True):
    """(reduce, segment, apply or None) kernels of a per-segment rule (``apply`` is None for
    ``segment_norms``, which updates nothing)."""
    key = (rule_name, parallel)
    ks = _KERNELS.get(key)
    if ks is None:
        compiled, glb, inline = _compiled()
        variant = f"_seg{_TAG}" + ("" if parallel else "_serial")
        extra = dict(glb, indices=prange if parallel else range)
        extra["transformed_grad"] = compiled["transformed_grad"]
        extra["pre"] = compiled[f"{rule_name}_pre"]
        extra["segrule"] = compiled[f"{rule_name}_segment"]
        extra["segment_step"] = inline(rebind(segment_loops.segment_step, extra))
        extra["pre_squares"] = inline(rebind(segment_loops._pre_squares, extra, "pre_squares"))
        extra["pre_row"] = inline(rebind(segment_loops._pre_row, extra, "pre_row"))
        decorate = njit(parallel=parallel, cache=True, nogil=True, error_model="numpy")
        reduce_t = segment_loops.CPU_REDUCE[pre_arity(rule_name)]
        reduce_k = specialize(reduce_t, rule_name, None, extra, decorate, variant)
        serial = njit(cache=True, nogil=True, error_model="numpy")
        seg_k = specialize(
            segment_loops.segment_pass, rule_name, None, dict(extra, indices=range), serial, variant
        )
        apply_k = None
        if rule_name in compiled:
            apply_t = segment_loops.CPU_APPLY[rules.SEGMENT_RULES[rule_name]]
            apply_k = specialize(apply_t, rule_name, compiled[rule_name], extra, decorate, variant)
        ks = (reduce_k, seg_k, apply_k)
        _KERNELS[key] = ks
    return ks


def stored_kernels(rule_name, parallel=True):
    """(reduce, segment, apply) kernels of a rule of ``rules.STORED_UPDATE``: the reduction that
    also stores each element's update and new state and steps the segments of one piece, the
    segment pass and ``p - r0 * y`` from the stored update for the others."""
    key = (rule_name, parallel, "stored")
    ks = _KERNELS.get(key)
    if ks is None:
        compiled, glb, inline = _compiled()
        variant = f"_seg{_TAG}" + ("" if parallel else "_serial")
        extra = dict(glb, indices=prange if parallel else range, skip_single=True)
        extra["transformed_grad"] = compiled["transformed_grad"]
        extra["segrule"] = compiled[f"{rule_name}_segment"]
        extra["segment_step"] = inline(rebind(segment_loops.segment_step, extra))
        extra["apply_stored_piece"] = inline(rebind(segment_loops.apply_stored_piece, extra))
        decorate = njit(parallel=parallel, cache=True, nogil=True, error_model="numpy")
        reduce_t = segment_loops.CPU_REDUCE_STORED[rules.SEGMENT_RULES[rule_name]]
        stored = compiled[f"{rule_name}_stored"]
        reduce_k = specialize(reduce_t, rule_name, stored, extra, decorate, variant + "_stored")
        serial = njit(cache=True, nogil=True, error_model="numpy")
        seg_k = specialize(
            segment_loops.segment_pass,
            rule_name,
            None,
            dict(extra, indices=range),
            serial,
            variant + "_stored",
        )
        apply_k = specialize(
            segment_loops.cpu_apply_stored, rule_name, None, extra, decorate, variant
        )
        ks = _KERNELS[key] = (reduce_k, seg_k, apply_k)
    return ks


def reduce_stored(rule_name, p, g, states, h, gs, flags, layout, out, u, st, r, sums, h64):
    """Launch 1 of a rule of ``rules.STORED_UPDATE``: :func:`reduce`'s sums, each element's
    update into ``u`` (an array like ``p``) and its new state into ``states``; the segments of
    one piece stepped whole (:func:`segment`'s ``r``, ``st``, ``sums`` and the update)."""
    lo, hi, seg, first = layout
    k = stored_kernels(rule_name, p.size >= PARALLEL_THRESHOLD)[0]
    k(p, g, *states, h + gs, flags, lo, hi, seg, out, u, first, st, r, sums, h64)


def segment_stored(rule_name, p, flags, layout, out, st, r, sums, h64, multi_piece=True):
    """Launch 2 of a rule of ``rules.STORED_UPDATE``: :func:`segment` for the segments of more
    than one piece; no launch when ``multi_piece`` is false
    (``segment_loops.has_multi_piece(layout[3])``: the reduction stepped every segment)."""
    if multi_piece:
        k = stored_kernels(rule_name, p.size >= PARALLEL_THRESHOLD)[1]
        k(layout[3], out, flags, st, r, sums, h64)


def apply_stored(rule_name, p, u, layout, r, multi_piece=True):
    """Launch 3 of a rule of ``rules.STORED_UPDATE``: ``p = p - r[seg, 0] * u`` in place over
    the segments of more than one piece; no launch when ``multi_piece`` is false (as
    :func:`segment_stored`: a parallel launch with nothing to do still wakes and joins every
    thread)."""
    lo, hi, seg, first = layout
    if multi_piece:
        k = stored_kernels(rule_name, p.size >= PARALLEL_THRESHOLD)[2]
        k(p, u, lo, hi, seg, first, r)


def reduce(rule_name, p, g, states, h, gs, flags, layout, out):
    """Launch 1: ``out[k] = (sum x^2, sum y^2)`` over piece ``k`` of ``layout``
    (``segment_loops.pieces``), ``(x, y) = <rule>_pre(...)``; ``out`` is (npieces, 2) float64."""
    lo, hi, seg, _ = layout
    k = kernels(rule_name, p.size >= PARALLEL_THRESHOLD)[0]
    k(p, g, *states[: pre_arity(rule_name)], h + gs, flags, lo, hi, seg, out)


def segment(rule_name, p, flags, layout, out, st, r, sums, h64):
    """Launch 2: per segment, ``sums[s]`` = its pieces' partials added in order, then ``r[s]``
    and ``st[s]`` from ``<rule>_segment``, computed in float64 (``h64``: the scalars in
    float64; ``r`` and ``st`` are stored in their arrays' dtype)."""
    k = kernels(rule_name, p.size >= PARALLEL_THRESHOLD)[1]
    k(layout[3], out, flags, st, r, sums, h64)


def apply(rule_name, p, g, states, h, gs, flags, layout, r):
    """Launch 3: ``<rule>(p, g, *states, h, flags, r0, r1)`` over every element, in place."""
    lo, hi, seg, _ = layout
    k = kernels(rule_name, p.size >= PARALLEL_THRESHOLD)[2]
    k(p, g, *states, h + gs, flags, lo, hi, seg, r)
