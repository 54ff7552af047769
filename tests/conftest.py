"""Test-session settings.

One BLAS thread: the suite runs many tiny matrix operations (2x2 to 50x50), for
which OpenBLAS's thread start-up costs 100-1000x the work on a loaded 2-core
machine.  Set before numpy is imported by the test modules.
"""

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")


def pytest_sessionfinish(session, exitstatus):
    """Shut down the servers of tests that ran over TCP (tests/served.py), if any were started."""
    import sys

    served = sys.modules.get("served")
    if served is not None:
        served.POOL.close()
