"""One-call linear algebra on an SPU: solve (the mean), inv and sample_gaussian (the second moments,
``driver.sampling``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .device import Device, RunReport
from .errors import SaturationError
from .sampling import SamplingReport, inv, sample_gaussian

__all__ = ["solve", "inv", "sample_gaussian", "SamplingReport"]

# after a step down, aim the largest node voltage at this fraction of the ADC range
_TARGET_FILL = 0.7
_STEP_DOWN = 4.0
_MAX_TRIES = 8


def solve(
    dev: Device,
    A: Any,
    b: Any,
    t: float = 200.0,
    burn_in: float | None = None,
    *,
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, RunReport]:
    """Solve A x = b on the device: A symmetric positive definite (n, n), b (n,).

    Loads A and b, runs for analog time t (tau) and returns the mean of the ADC
    samples taken after ``burn_in`` (default t / 2), in the user's units.
    The array settles as e^{-lambda_min t}, lambda_min the smallest eigenvalue of
    A / (max|A| / g_max), so choose t >~ 10 / lambda_min.

    Auto-ranging, as on a bench instrument: b starts at the DAC's full scale; if a
    node hits a rail or the ADC clips, b is driven at a quarter of that amplitude
    and the run repeated (up to 8 runs); after a step down the input is raised
    once so the answer fills about 70 % of the ADC range.  ``return_report``
    also returns the RunReport of the run whose mean is returned.  Raises
    SaturationError when no input level runs cleanly (A not positive definite).

    Every argument is checked before the first device call (InvalidInputError, nothing
    loaded); a call that fails after that leaves A and b loaded, as its message says.
    """
    # every argument is checked before the first device call, so a refused call changes nothing
    t = dev._checked_run(t, 0.0)[0]
    t, burn_in = dev._checked_run(t, 0.5 * t if burn_in is None else burn_in)
    A = dev._checked_matrix(A)
    b = dev._checked_vector(b, A.shape[0])
    matrix_scale = dev.load_matrix(A).scale
    natural = dev.load_vector(b).scale
    fraction = 1.0
    raised = False
    best: tuple[np.ndarray, RunReport] | None = None
    for _ in range(_MAX_TRIES):
        report = dev.run(t, burn_in, on_saturation="flag")
        if report.saturated or report.adc_clipped:
            if raised:
                break  # the level before the raise was clean: keep its answer
            fraction /= _STEP_DOWN
            dev.load_vector(b, scale=natural / fraction)
            continue
        x = dev.read_mean()
        best = (x, report)
        volts = float(np.abs(x).max()) * matrix_scale / (natural / fraction)
        fill = volts / dev.info.adc_range_v
        if fraction < 1.0 and not raised and 0.0 < fill < 0.5 * _TARGET_FILL:
            fraction = min(1.0, fraction * _TARGET_FILL / fill)
            raised = True
            dev.load_vector(b, scale=natural / fraction)
            continue
        break
    if best is None:
        raise SaturationError(
            f"the array saturated at every input level down to {fraction:.2g} of full scale;"
            " A is probably not positive definite (check its eigenvalues).  The device now holds A and b"
            f" (b at {fraction:.2g} of the DAC's full scale) and the state of the last, discarded run"
        )
    return best if return_report else best[0]
