"""Which rank holds which part: contiguous slices of a flat buffer (ZeRO) and each rank's samples
of an epoch (round-robin over one seeded permutation)."""

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


def shard_bounds(n, world, rank):
    """(lo, hi): the slice ``[lo, hi)`` of a flat buffer of ``n`` elements owned by ``rank``."""
    counts, displs = shard_sizes(n, world)
    if not 0 <= check_int("rank", rank) < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    return displs[rank], displs[rank] + counts[rank]


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
