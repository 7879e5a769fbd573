"""Which rank holds which part: contiguous slices of a flat buffer (ZeRO; whole tensors for the
per-tensor optimizers) and each rank's samples of an epoch (round-robin over one seeded permutation)."""

import numpy as np

from ..validation import check_int


def shard_sizes(n, world):
    """(counts, displacements): ``n`` elements split into ``world`` contiguous slices whose sizes
    differ by at most one, the larger ones first (rank 0 always has the most)."""
    n, world = check_int("n", n, lo=0), check_int("world", world, lo=1)
    base, extra = divmod(n, world)
    counts = [base + (1 if r < extra else 0) for r in range(world)]
    displs = [0] * world
    for r in range(1, world):
        displs[r] = displs[r - 1] + counts[r - 1]
    return counts, displs


def block_shard_sizes(n, world, block):
    """(counts, displacements): ``n`` elements split into ``world`` contiguous slices cut on
    multiples of ``block`` (the buffer's ``ceil(n / block)`` blocks dealt whole by
    :func:`shard_sizes`: block counts differing by at most one, the larger ones first; the last
    block may be partial). Every slice starts on a block boundary, so its blocks are blocks of
    the whole buffer: ZeRO-1 shards of 8-bit state (one absmax per block of 256 elements).
    Ranks past the last block get empty slices."""
    n = check_int("n", n, lo=0)
    block = check_int("block", block, lo=1)
    block_counts, block_displs = shard_sizes(-(-n // block), world)
    displs = [min(d * block, n) for d in block_displs]
    counts = [min((d + c) * block, n) - lo for d, c, lo in zip(block_displs, block_counts, displs)]
    return counts, displs


def shard_bounds(n, world, rank):
    """(lo, hi): the slice ``[lo, hi)`` of a flat buffer of ``n`` elements owned by ``rank``."""
    counts, displs = shard_sizes(n, world)
    if not 0 <= check_int("rank", rank) < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    return displs[rank], displs[rank] + counts[rank]


def segment_shards(sizes, world):
    """(counts, displacements, bounds): tensors of element counts ``sizes`` (back to back in a
    flat buffer) dealt to ``world`` ranks whole, as contiguous runs, for the per-tensor
    optimizers under ZeRO-1. Rank ``r`` owns tensors ``bounds[r]:bounds[r + 1]``, i.e. the
    elements ``[displs[r], displs[r] + counts[r])``.

    Greedy and deterministic: cut ``r`` (1 .. world - 1) is the tensor boundary nearest to
    ``r * n / world`` (the lower one on a tie), moved on to give rank ``r - 1`` at least one
    tensor while any is left. So the ranks that own nothing (fewer tensors than ranks, or a
    tensor larger than several shares) are the last ones, and rank 0 owns a tensor."""
    sizes = [check_int("sizes[i]", s, lo=0) for s in sizes]
    world = check_int("world", world, lo=1)
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)
    n = edges[-1]
    bounds, j = [0], 0
    for r in range(1, world):
        target = r * n  # compared with world * edge: exact integers
        while j + 1 < len(edges) and abs(world * edges[j + 1] - target) < abs(
            world * edges[j] - target
        ):
            j += 1
        j = max(j, min(bounds[-1] + 1, len(sizes)))
        bounds.append(j)
    bounds.append(len(sizes))
    displs = [edges[b] for b in bounds[:-1]]
    counts = [edges[bounds[r + 1]] - displs[r] for r in range(world)]
    return counts, displs, bounds


def shard_indices(n, epoch, seed, rank, world, *, shuffle=True, drop_last=False):
    """The sample indices of ``rank`` for ``epoch``: one permutation of ``range(n)`` drawn from
    ``numpy.random.default_rng([seed, epoch])`` (the same on every rank), dealt round-robin, so
    rank ``r`` gets ``perm[r::world]`` (as ``torch.utils.data.DistributedSampler``).

    Every rank gets the same number of indices, so all ranks take the same number of steps: with
    ``drop_last=False`` the permutation is padded by repeating its start up to a multiple of
    ``world``, with ``drop_last=True`` its tail is dropped. Round-robin dealing makes batch ``k``
    of size ``b`` on every rank together exactly batch ``k`` of size ``world*b`` of the one-process
    order ``shard_indices(n, epoch, seed, 0, 1)`` (when ``world*b`` divides ``n``), so data-parallel
    training matches single-process training with the global batch size.
    """
    n = check_int("n", n, lo=0)
    world = check_int("world", world, lo=1)
    rank = check_int("rank", rank, lo=0)
    if rank >= world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if shuffle:
        perm = np.random.default_rng(
            [check_int("seed", seed, lo=0), check_int("epoch", epoch, lo=0)]
        )
        perm = perm.permutation(n).astype(np.int64)
    else:
        perm = np.arange(n, dtype=np.int64)
    if drop_last:
        total = (n // world) * world
        perm = perm[:total]
    else:
        total = -(-n // world) * world
        if total != n and n > 0:
            perm = np.resize(perm, total)  # repeats the start
    return perm[rank:total:world].copy()
