"""A transient run in bounded chunks, so that it can be stopped.

The numba kernels hold the interpreter for the whole of a call, so a run made of one call cannot be
interrupted: Ctrl-C takes effect when it ends, and a served device cannot hear ABORT.  The firmware
therefore hands the kernel a chunk of steps at a time, about ``CHUNK_S`` seconds of wall time each,
and between chunks Python runs: a KeyboardInterrupt is raised there, and ``interrupt()`` (the
server's ABORT and wall-time checks) is asked whether to stop.

Chunking does not change a bit.  Chunks end on ADC conversion steps, so the kernel's step and
sampling phases, its draws from the one Generator and its accumulators (passed on, not restarted)
are those of one call; once the window's conversions have begun, chunks also end on multiples of
``sample_stride`` conversions, so each chunk's snapshot rows continue the last chunk's (the kernel
is handed the snapshot buffer from the next unwritten row on).  Chunk sizes follow the measured
speed, and results do not depend on them.

A run that is stopped raises; the caller (``Engines._run_transient``) restores the noise stream, so
the device is as it was before the run: the run is discarded, never kept in part.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

__all__ = ["CHUNK_S", "advance_in_chunks", "Stopped"]

CHUNK_S = 0.1  # wall time per chunk: a stop request waits at most about this long (Ctrl-C asks for 0.5 s)
# the first chunk, before the speed is known: this much work (multiply-adds, about 10 to 40 ms), so a short
# run on a small array is one call, and a step of a huge array is not repeated blindly
_FIRST_FLOPS = 2e7
_GROWTH = 16  # a chunk is at most this many times the last (a timer's noise on a short chunk is not trusted)


class Stopped(Exception):
    """``interrupt()`` asked to stop the run; ``reason`` says who, ``steps`` how far it had gone."""

    def __init__(self, reason: str, steps: int):
        super().__init__(reason)
        self.reason = reason
        self.steps = steps


def advance_in_chunks(
    advance: Callable,
    snapshots: np.ndarray,
    stride: int,
    n_steps: int,
    steps_per_sample: int,
    first_sample_step: int,
    interrupt: Callable[[], str] | None = None,
    max_chunk_steps: int | None = None,
    flops_per_step: float = 1.0,
) -> tuple[int, int, bool, int, bool]:
    """Run ``advance(steps, first_sample_step, snapshots, stride)`` (one kernel call, as in ``engines``) over
    consecutive chunks that make up ``n_steps``; returns (steps, samples, saturated, clipped, runaway) as one
    call would.  ``interrupt()`` is called between chunks; a non-empty answer raises :class:`Stopped`.
    ``max_chunk_steps`` caps a chunk (tests force small chunks with it); ``flops_per_step`` (about n^2 for a
    dense array, 3 m N for a GGN load) sizes the first chunk.  Cost: the kernel's, plus one Python round and
    kernel dispatch per chunk (about 15 us).  The first chunk rounds down, later ones grow to CHUNK_S."""
    sps = steps_per_sample
    window_start = first_sample_step - sps  # steps before the window's first conversion (a multiple of sps)
    done = samples = clipped = 0
    saturated = False
    size = max(1, int(min(_FIRST_FLOPS / max(flops_per_step, 1.0), n_steps)))
    while done < n_steps:
        chunk = _aligned(done, min(size, max_chunk_steps or size), window_start, sps, stride)
        chunk = min(chunk, n_steps - done)
        rows_done = max(0, (done - window_start) // sps) // stride if snapshots.shape[0] else 0
        started = time.perf_counter()
        steps, taken, hit, clips, runaway = advance(
            chunk, max(1, first_sample_step - done), snapshots[rows_done:], stride
        )
        elapsed = time.perf_counter() - started
        samples += int(taken)
        clipped += int(clips)
        saturated = saturated or bool(hit)
        if runaway:
            return done + int(steps), samples, saturated, clipped, True
        done += chunk
        if done < n_steps and interrupt is not None:
            reason = interrupt()
            if reason:
                raise Stopped(reason, done)
        # aim the next chunk at CHUNK_S of wall time, growing at most _GROWTH-fold
        rate = chunk / max(elapsed, 1e-6)
        size = max(sps, min(_GROWTH * chunk, int(rate * CHUNK_S)))
    return n_steps, samples, saturated, clipped, False


def _aligned(done: int, want: int, window_start: int, sps: int, stride: int) -> int:
    """A chunk length near ``want`` (at least one conversion period) that ends on a conversion step and,
    within the window, on a multiple of ``stride`` conversions from its start."""
    end = done + max(want, sps)
    if end <= window_start:
        return (end // sps) * sps - done or sps
    block = sps * stride
    end = window_start + -(-(end - window_start) // block) * block  # up to the next stride boundary
    return end - done
