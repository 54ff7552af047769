"""The emulator's BLAS and LAPACK calls run on a fixed number of threads, so its bits do not depend on the host's.

OpenBLAS splits a product or a factorisation differently on 1 and on 2 threads, and the sums then
round differently: the exact engine's answer for a dense n = 256 matrix, or a GGN load with m = 256
rows, changed in the last bits between ``OPENBLAS_NUM_THREADS=1`` and 2.  Every command the device
executes that calls BLAS (``Firmware.handle`` lists those that do not) therefore runs inside
:func:`fixed_threads`, which sets each BLAS library loaded in the
process (numpy's, scipy's, and through scipy the one numba's kernels call) to ``BLAS_THREADS``
threads for the command and restores the caller's setting afterwards.

``BLAS_THREADS`` is 1, or ``$SPU_EMULATOR_BLAS_THREADS`` when set: more threads make a large exact
engine preparation faster, and the bits then hold for that count only.  Bits are the same for the
same numpy and scipy builds on the same CPU family; another OpenBLAS build or CPU kernel (AVX2
against AVX-512) may round differently.

Cost: about 15 us per command when the host runs BLAS on other counts (a get, a set and a restore in
each library), 2 us when it is already at the count.
"""

from __future__ import annotations

import os
import threading

from threadpoolctl import ThreadpoolController

__all__ = ["BLAS_THREADS", "fixed_threads"]


def _threads_from_env() -> int:
    raw = os.environ.get("SPU_EMULATOR_BLAS_THREADS", "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"SPU_EMULATOR_BLAS_THREADS must be a positive integer, got {raw!r}; unset it for 1")
    return value


BLAS_THREADS: int = _threads_from_env()

_lock = threading.Lock()
_depth = 0  # commands inside fixed_threads right now (threads of one process share the libraries)
_saved: list[tuple[object, int]] = []
_libraries: list | None = None


def _blas_libraries() -> list:
    global _libraries
    if _libraries is None:  # found once (about 5 ms): the emulator's imports have loaded them by now
        _libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    return _libraries


class _FixedThreads:
    """What :func:`fixed_threads` returns: a class, not a generator, since every RUN enters it (a generator
    context manager costs about 2 us more per command)."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _depth
        with _lock:
            if _depth == 0:
                _saved.clear()
                for library in _blas_libraries():
                    count = library.get_num_threads()
                    if count != BLAS_THREADS:
                        _saved.append((library, count))
                        library.set_num_threads(BLAS_THREADS)
            _depth += 1

    def __exit__(self, *exc: object) -> None:
        global _depth
        with _lock:
            _depth -= 1
            if _depth == 0:
                for library, count in _saved:
                    library.set_num_threads(count)
                _saved.clear()


_FIXED = _FixedThreads()


def fixed_threads() -> _FixedThreads:
    """Run the body with every BLAS library at ``BLAS_THREADS`` threads; restore the caller's counts after.

    Re-entrant and thread-safe: the first of overlapping bodies sets the counts, the last restores them."""
    return _FIXED
