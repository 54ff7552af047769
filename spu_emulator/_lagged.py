"""Numba kernel of the lagged second-moment accumulator (RUN's record_lags).  Private: the firmware calls it.

For lags L_1 < ... < L_q (ADC conversions) the device keeps, over a run's window of K conversions,

    sums[l] = sum_{k = 1}^{K - L_l} x_{k + L_l} x_k^T          (n x n codes^2 each)

where x_k is the k-th conversion of every cell after burn_in: q n^2 accumulators and a ring buffer of
the last L_q + 1 conversions, so the memory is bounded by the lags, not by K.  Conversions arrive a
chunk at a time (the transient engine records a chunk of snapshots, then hands it over), so a run of
any length needs only the chunk, the ring and the sums.  No random draws.
"""

from __future__ import annotations

from numba import njit

__all__: list[str] = []


@njit(cache=True)
def _accumulate_lagged(chunk, start, ring, lags, sums):
    """Add the pairs that end in ``chunk`` to ``sums``.

    chunk: (c, n) codes of conversions start, ..., start + c - 1 of the window (0-based, in order);
    ring: (h, n) the last h conversions, conversion k in row k % h, h > max(lags) (kept between
    chunks: row contents before ``start`` are those of the previous chunk); lags: (q,) int64, each
    0 <= lag < h; sums: (q, n, n), sums[l, i, j] += x_k[i] x_{k - lags[l]}[j] for every conversion
    k in the chunk with k >= lags[l].  Cost O(c q n^2).  No random draws.
    """
    c, n = chunk.shape
    h = ring.shape[0]
    for row in range(c):
        k = start + row
        slot = k % h
        for i in range(n):
            ring[slot, i] = chunk[row, i]
        for which in range(lags.shape[0]):
            lag = lags[which]
            if k < lag:
                continue
            earlier = (k - lag) % h
            for i in range(n):
                xi = chunk[row, i]
                for j in range(n):
                    sums[which, i, j] += xi * ring[earlier, j]
