"""Pairwise Euclidean distances that stay exact where rounding would matter, and ranks that keep exact ties.

The expansion ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` turns a distance matrix into one matrix product, but
its rounding error is a few ulps of ``|a|^2 + |b|^2``, not of the distance. Identical rows then come out
~1e-8 apart instead of 0 (the square root amplifies the noise of a squared distance near 0), and the
distances inside a tight cluster far from the origin lose most of their digits. :func:`squared_distances`
keeps the matrix product for the bulk and recomputes from the differences the pairs whose squared
distance is small next to their squared norms, where that error is large relative to the result.

Rank-based comparisons (Spearman RSA, the geo-topological transform) must see two equal distances as a
tie, while distances of the same true value still differ in their last bits when they come from
different sums. :func:`average_ranks` treats values within a tiny fraction of their own size as ties
(rounding is relative to each value, so distances of very different sizes keep their order).
"""

from __future__ import annotations

import bisect

import torch

# Pairs with |a - b|^2 below this fraction of |a|^2 + |b|^2 are recomputed from their differences; every
# other squared distance then has a relative rounding error of at most ~1e-10 (float64).
EXACT_BELOW = 1e-6
# Values closer than this fraction of their own size are ties for ranking: far above the relative rounding
# of the distances above (~1e-10) and far below any difference that means something.
TIE_TOLERANCE = 1e-9
_BLOCK_BYTES = 1 << 26  # one block of squared distances (float64) stays under 64 MiB


def squared_distances(x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``(stop - start, n)`` (float64) from rows ``start:stop`` of ``x`` to every row.

    One matrix product per block of rows; the pairs whose squared distance is below ``EXACT_BELOW`` of
    their squared norms are then recomputed from the coordinate differences (with the other pairs of
    the same rows and columns), so duplicate rows are exactly 0 apart and near-duplicates keep their
    digits. A row's distance to itself is exactly 0.
    Centred inputs have smaller norms, so fewer pairs need the recomputation. Memory beyond the result
    is bounded by about 64 MiB per block; ``x`` must be on a device with float64 support.
    """
    x = x.to(torch.float64)
    n = x.shape[0]
    stop = n if stop is None else stop
    sq = (x * x).sum(1)
    sq_max = float(sq.max())
    out = torch.empty((stop - start, n), dtype=torch.float64, device=x.device)
    rows = max(1, min(stop - start, _BLOCK_BYTES // (8 * n)))
    for lo in range(start, stop, rows):
        hi = min(stop, lo + rows)
        block = out[lo - start : hi - start]
        own = torch.arange(hi - lo, device=x.device)
        torch.addmm(sq[None, :], x[lo:hi], x.T, alpha=-2.0, out=block)
        block.add_(sq[lo:hi, None])
        block[own, own + lo] = float("inf")
        # Only rows whose nearest other row is close next to the largest norms can hold a pair to redo.
        suspect = torch.nonzero(block.amin(1) < EXACT_BELOW * (sq[lo:hi] + sq_max)).flatten()
        if suspect.numel():
            near = block[suspect] < EXACT_BELOW * (sq[lo + suspect, None] + sq[None, :])
            cols = torch.nonzero(near.any(0)).flatten()
            del near
            # every pair of those rows and columns, from the differences (torch's direct kernel)
            exact = torch.cdist(x[lo + suspect], x[cols], compute_mode="donot_use_mm_for_euclid_dist")
            block[suspect[:, None], cols[None, :]] = exact.square_()
        block[own, own + lo] = 0.0
        block.clamp_min_(0.0)
    return out


def _tie_bound(value: float, tolerance: float) -> float:
    """The largest value that ties with ``value`` as the smallest of a group: within ``tolerance`` of the
    larger of the two magnitudes (only an exact 0 ties with 0, and no tie crosses 0)."""
    return value / (1.0 - tolerance) if value >= 0.0 else value * (1.0 - tolerance)


def average_ranks(v: torch.Tensor, tolerance: float = TIE_TOLERANCE) -> torch.Tensor:
    """Ranks 1..m of the 1-D ``v`` (float64), ties given their average rank (scipy.stats.rankdata 'average').

    Values equal up to rounding share one rank: in sorted order, a group of ties starts at its smallest
    value ``a`` and takes every following ``b`` with ``b - a <= tolerance * max(|a|, |b|)``. Ties are
    measured from the group's first value, not from each neighbour, so a run of close values does not
    chain into one rank across a wider range.
    """
    order = torch.argsort(v, stable=True)
    ordered = v[order]
    m = ordered.numel()
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    if m > 1:
        low, high = ordered[:-1], ordered[1:]
        new_group[1:] = (high - low) > tolerance * torch.maximum(low.abs(), high.abs())
        # a run of close neighbours that reaches beyond its first value's tolerance is split greedily
        run = torch.cumsum(new_group, 0) - 1
        first = ordered[torch.nonzero(new_group).flatten()][run]
        reach = torch.where(first >= 0, first / (1.0 - tolerance), first * (1.0 - tolerance))
        too_far = torch.unique(run[ordered > reach])
        if too_far.numel():
            values = ordered.cpu().tolist()
            starts = torch.nonzero(new_group).flatten().cpu().tolist() + [m]
            splits = []
            for r in too_far.cpu().tolist():
                i, stop = starts[r], starts[r + 1]
                while True:
                    i = bisect.bisect_right(values, _tie_bound(values[i], tolerance), i, stop)
                    if i >= stop:
                        break
                    splits.append(i)
            new_group[torch.tensor(splits, dtype=torch.long, device=v.device)] = True
    group = torch.cumsum(new_group, 0) - 1
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    average = starts.to(torch.float64) + (counts.to(torch.float64) - 1.0) / 2.0 + 1.0
    ranks = torch.empty(v.shape, dtype=torch.float64, device=v.device)
    ranks[order] = average[group]
    return ranks
