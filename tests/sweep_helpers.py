"""User workloads for tests/test_sweep.py, given to sweeps as ``sweep_helpers:NAME`` (tests/ is on the path)."""

from __future__ import annotations

import time

import numpy as np


def noisy_mean(device, rng, t: float = 20.0, pause_s: float = 0.0):
    """Solve a diagonal system and return the device's answer, its draw from rng, and (optionally) pause."""
    time.sleep(pause_s)
    n = device.info.cells
    b = rng.standard_normal(n)
    device.load_matrix(np.eye(n))
    device.load_vector(b)
    device.run(t)
    x = device.read_mean()
    return {"x0": float(x[0]), "draw": float(rng.standard_normal()), "kappa0": device.info.kappa0}


noisy_mean.units = {"x0": "V", "draw": "-"}


def failing(device, rng, when: int = 6):
    """Raises for adc.bits == ``when``: the sweep records the error and goes on."""
    if device.info.adc_bits == when:
        raise RuntimeError(f"no luck at {when} bits")
    return {"bits": device.info.adc_bits}


def not_rows(device, rng):
    return 42
