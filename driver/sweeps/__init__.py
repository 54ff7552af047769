"""Robustness studies: a grid of device variants x seeds x a workload, run anywhere, with the same bits.

    import driver
    result = driver.sweep("examples/robustness.yaml", out="robustness", workers=2)   # or dask="tcp://..."
    rows = result.rows()                      # results.csv: one row per point x seed x problem

A sweep file (see :mod:`driver.sweeps.plan`) names the base device, a grid of dotted spec paths of
``firmware_spec/schema.yaml`` (a device variant is the spec plus those overrides, checked by the same
loader as a file), the seeds, and a workload (:mod:`driver.sweeps.workloads`: solve, inv, sample,
tngd, or a user's ``module:function``).  ``spu sweep SWEEP.yaml --out DIR`` is the command line.
Execution (:mod:`driver.sweeps.run`): serial, local processes, or a Dask cluster; every cell's
randomness derives from (sweep seed, point, seed) alone, so the results do not depend on which.
"""

from .plan import Cell, Sweep, load_sweep
from .run import SweepInterrupted, SweepResult, read_results, run_cell, sweep
from .workloads import UNITS, WORKLOADS

__all__ = [
    "sweep",
    "load_sweep",
    "Sweep",
    "Cell",
    "SweepResult",
    "SweepInterrupted",
    "read_results",
    "run_cell",
    "WORKLOADS",
    "UNITS",
]
