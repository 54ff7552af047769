"""Host-side LAPACK on a fixed thread count, where a result feeds what the device is sent.

OpenBLAS rounds differently on 1 and on 2 threads, so ``load_vector(b, scale="auto")``'s lambda_min
(driver.ranging) changed in the last bits with ``OPENBLAS_NUM_THREADS``, and the readout scale with
it.  The device side does the same in ``spu_emulator.blas`` (the driver does not import it: DESIGN
section 2); this is the host's copy, used only where a host result enters the device's inputs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["fixed_threads"]

_lock = threading.Lock()
_depth = 0
_saved: list[tuple[object, int]] = []
_libraries: list | None = None


@contextmanager
def fixed_threads(count: int = 1) -> Iterator[None]:
    """Run the body with every loaded BLAS library at ``count`` threads, then restore the caller's counts.

    Re-entrant and thread-safe; a few microseconds per use after the first (which finds the libraries)."""
    global _depth, _libraries
    with _lock:
        if _depth == 0:
            if _libraries is None:
                from threadpoolctl import ThreadpoolController

                _libraries = ThreadpoolController().select(user_api="blas").lib_controllers
            _saved.clear()
            for library in _libraries:
                current = library.get_num_threads()
                if current != count:
                    _saved.append((library, current))
                    library.set_num_threads(count)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for library, current in _saved:
                    library.set_num_threads(current)
                _saved.clear()
