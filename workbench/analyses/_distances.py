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

import numpy as np
import torch

# Pairs with |a - b|^2 below this fraction of |a|^2 + |b|^2 are recomputed from their differences; every
# other squared distance then has a relative rounding error of at most ~1e-10 (float64).
EXACT_BELOW = 1e-6
# Values closer than this fraction of their own size are ties for ranking: far above the relative rounding
# of the distances above (~1e-10) and far below any difference that means something.
TIE_TOLERANCE = 1e-9
_BLOCK_BYTES = 1 << 26  # one block of squared distances (float64) stays under 64 MiB
_CHUNK = 1 << 18  # values per chunk of the ranking passes (2 MiB of float64)


def squared_distances(
    x: torch.Tensor, start: int = 0, stop: int | None = None, sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared Euclidean distances ``(stop - start, n)`` (float64) from rows ``start:stop`` of ``x`` to every row.

    One matrix product per block of rows; the pairs whose squared distance is below ``EXACT_BELOW`` of
    their squared norms are then recomputed from the coordinate differences (with the other pairs of
    the same rows and columns), so duplicate rows are exactly 0 apart and near-duplicates keep their
    digits. A row's distance to itself is exactly 0.
    Centred inputs have smaller norms, so fewer pairs need the recomputation. Memory beyond the result
    is bounded by about 64 MiB per block; ``x`` must be on a device with float64 support. ``sq``: the
    squared row norms ``(x * x).sum(1)`` when the caller already has them (one call per block of rows).
    """
    x = x.to(torch.float64)
    n = x.shape[0]
    stop = n if stop is None else stop
    if sq is None:
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


def condensed_distances(x: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """The upper triangle of :func:`squared_distances` of ``x`` (``squared=False``: of the distances), row by
    row as scipy's ``pdist`` orders it: ``n (n - 1) / 2`` float64 values, with the same bits as the
    matrix's triangle. The rows are computed in the blocks :func:`squared_distances` uses, so memory beyond
    the result is one block (about 64 MiB), never the ``n x n`` matrix."""
    x = x.to(torch.float64)
    n = x.shape[0]
    out = torch.empty(n * (n - 1) // 2, dtype=torch.float64, device=x.device)
    sq = (x * x).sum(1)
    rows = max(1, min(n, _BLOCK_BYTES // (8 * n)))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        block = squared_distances(x, lo, hi, sq=sq)
        for i in range(lo, hi):
            start = i * n - i * (i + 1) // 2
            out[start : start + n - 1 - i].copy_(block[i - lo, i + 1 :])
        del block
        segment = out[lo * n - lo * (lo + 1) // 2 : hi * n - hi * (hi + 1) // 2]
        if not squared:
            segment.sqrt_()
    return out


def _tie_bound(value: float, tolerance: float) -> float:
    """The largest value that ties with ``value`` as the smallest of a group: within ``tolerance`` of the
    larger of the two magnitudes (only an exact 0 ties with 0, and no tie crosses 0)."""
    return value / (1.0 - tolerance) if value >= 0.0 else value * (1.0 - tolerance)


def average_ranks(v: torch.Tensor, tolerance: float = TIE_TOLERANCE, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ranks 1..m of the 1-D ``v`` (float64), ties given their average rank (scipy.stats.rankdata 'average').

    Values equal up to rounding share one rank: in sorted order, a group of ties starts at its smallest
    value ``a`` and takes every following ``b`` with ``b - a <= tolerance * max(|a|, |b|)``. Ties are
    measured from the group's first value, not from each neighbour, so a run of close values does not
    chain into one rank across a wider range.

    ``out``: a float64 tensor of ``v``'s shape for the ranks; it may be ``v`` itself, which is read only
    by the sort. Memory beyond ``v`` and the result: the sorted values, their order (int32 below 2**31
    values) and a flag per value; every other step works on chunks of ``_CHUNK`` values.
    """
    m = v.numel()
    ordered, order = _sort(v)
    device = v.device
    new_group = torch.empty(m, dtype=torch.bool, device=device)
    new_group[:1] = True
    for lo in range(1, m, _CHUNK):
        hi = min(m, lo + _CHUNK)
        low, high = ordered[lo - 1 : hi - 1], ordered[lo:hi]
        new_group[lo:hi] = (high - low) > tolerance * torch.maximum(low.abs(), high.abs())
    # a run of close neighbours that reaches beyond its first value's tolerance is split greedily: such a
    # group's last (largest) value is beyond the reach of its first
    far_groups: dict[int, int] = {}  # first position -> last position, of each group to split
    carry = 0
    for lo in range(0, m, _CHUNK):
        hi = min(m, lo + _CHUNK)
        first_pos = _group_starts(new_group[lo:hi], lo, carry)
        carry = int(first_pos[-1])
        first = ordered[first_pos]
        reach = torch.where(first >= 0, first / (1.0 - tolerance), first * (1.0 - tolerance))
        far = torch.nonzero(ordered[lo:hi] > reach).flatten()
        if far.numel():
            starts, last = first_pos[far].tolist(), (far + lo).tolist()
            for s, e in zip(starts, last):
                far_groups[s] = max(e, far_groups.get(s, e))
    if far_groups:
        splits = []
        for s, e in far_groups.items():
            values = ordered[s : e + 1].cpu().tolist()
            i, stop = 0, len(values)
            while True:
                i = bisect.bisect_right(values, _tie_bound(values[i], tolerance), i, stop)
                if i >= stop:
                    break
                splits.append(s + i)
        new_group[torch.tensor(splits, dtype=torch.long, device=device)] = True
    # the average rank of each sorted position, written over the sorted values: first the first position of
    # its group (front to back), then, back to front, start + (count - 1) / 2 + 1 with the group's last position
    carry = 0
    for lo in range(0, m, _CHUNK):
        hi = min(m, lo + _CHUNK)
        first_pos = _group_starts(new_group[lo:hi], lo, carry)
        carry = int(first_pos[-1])
        ordered[lo:hi] = first_pos
    carry = m - 1
    for hi in range(m, 0, -_CHUNK):
        lo = max(0, hi - _CHUNK)
        following = torch.arange(lo + 1, hi + 1, device=device)
        is_start = torch.ones(hi - lo, dtype=torch.bool, device=device)
        is_start[: hi - lo - 1] = new_group[lo + 1 : hi]
        if hi < m:
            is_start[-1] = new_group[hi]
        candidates = torch.where(is_start, following - 1, carry).flip(0)
        last_pos = torch.cummin(candidates, 0).values.flip(0)
        carry = int(last_pos[0])
        starts = ordered[lo:hi]
        counts = last_pos.to(torch.float64).sub_(starts).add_(1.0)
        ordered[lo:hi] = starts + (counts - 1.0) / 2.0 + 1.0
    if out is None:
        out = torch.empty(v.shape, dtype=torch.float64, device=device)
    if device.type == "cpu":
        out.numpy()[order.numpy()] = ordered.numpy()  # numpy scatters with int32 indices as they are
    else:
        out[order] = ordered
    return out


def _sort(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of the 1-D ``v`` in ascending order, and their positions in ``v`` (stable). On the CPU the
    positions are int32 below 2**31 values and the sort's work space is half the values (numpy's stable sort),
    where torch's would add the values again and int64 positions."""
    if v.device.type != "cpu":
        return torch.sort(v, stable=True)
    values = v.detach().contiguous().numpy()
    order = np.argsort(values, kind="stable")
    if order.size < 2**31:
        order = order.astype(np.int32)
    return torch.from_numpy(values[order]), torch.from_numpy(order)


def _group_starts(new_group: torch.Tensor, offset: int, carry: int) -> torch.Tensor:
    """The position of the first value of each value's group, for a chunk of flags starting at ``offset``;
    ``carry``: the group start of the value before the chunk."""
    positions = torch.arange(offset, offset + new_group.numel(), device=new_group.device)
    starts = torch.where(new_group, positions, carry)
    return torch.cummax(starts, 0).values
