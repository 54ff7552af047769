"""Testing your own algorithm against device variants: a refined solve, three ways.

    python -m pytest examples/test_my_solver.py                    # presets x seeds, and the ADC search
    python -m pytest examples/test_my_solver.py -s                 # ... printing the width it finds
    python -m pytest examples/test_my_solver.py --spu-set adc.bits=8 --spu-set noise.kappa0=1e-4
    python -m pytest examples/test_my_solver.py --spu-preset spu-8 --spu-seeds 10

The algorithm is ``refined_solve``: iterative refinement on the host (residual b - A x in float64,
correction solved on the device).  Each device solve is only good to a few percent (element
mismatch, capacitor tolerance, converter resolution), but the error contracts by that factor per round.

1. ``test_refined_solve_meets_its_tolerance``: the ``spu`` marker runs it on three presets x three
   seeds (``test_refined_solve_meets_its_tolerance[spu-8-seed1]``, ...) through the ``spu_device``
   fixture; a failure prints the device's effective spec, seed, call timeline and the one
   ``driver.open(...)`` line that reproduces it.
2. ``test_refinement_gains_a_factor_of_ten``: a property that must hold on any plausible device; the
   marker gives its device, and CI tightens it for the whole run with ``--spu-set`` (which beats the
   marker): ``--spu-set coupling.mismatch=0.05 --spu-set adc.bits=8`` still passes, whereas
   test 1's absolute tolerance then fails on 4 of its 9 devices (5 % mismatch leaves ~1e-3 after
   three rounds): the failure sections say which, and how to open each again.
3. ``test_adc_width_where_refinement_misses_its_tolerance``: hypothesis searches the ADC width
   (``driver.testing.device_specs``) for one where the refined solve misses its tolerance; shrinking
   toward the preset's 12 bits makes the counterexample the widest failing width, so the test learns
   where the algorithm breaks (4 bits on spu-8, seed 0) and checks it is below the 8 bits we build for.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import find, settings
from hypothesis.errors import NoSuchExample

import driver
from driver.testing import device_specs

TOLERANCE = 1e-3  # relative error the application needs
ROUNDS = 3  # device solves per refined solve
ADC_BITS_WE_BUILD_FOR = 8


def refined_solve(dev: driver.Device, A: np.ndarray, b: np.ndarray, rounds: int = ROUNDS, t: float = 100.0):
    """x ~ A^-1 b: a device solve, then ``rounds - 1`` corrections x += solve(A, b - A x) with the
    residual in float64 on the host.  Costs ``rounds`` loads and runs of analog time t (tau)."""
    x = driver.linalg.solve(dev, A, b, t=t)
    for _ in range(rounds - 1):
        x = x + driver.linalg.solve(dev, A, b - A @ x, t=t)
    return x


def problem(n: int = 8, cond: float = 10.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed SPD system (eigenvalues 1 .. cond), its right-hand side and its exact solution."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (q * np.geomspace(1.0, cond, n)) @ q.T
    A = 0.5 * (A + A.T)
    b = rng.standard_normal(n)
    return A, b, np.linalg.solve(A, b)


def relative_error(x: np.ndarray, x_true: np.ndarray) -> float:
    return float(np.linalg.norm(x - x_true) / np.linalg.norm(x_true))


@pytest.mark.spu(presets=["ideal", "spu-8", "spu-8-lc"], seeds=3)
def test_refined_solve_meets_its_tolerance(spu_device):
    A, b, x_true = problem()
    assert relative_error(refined_solve(spu_device, A, b), x_true) < TOLERANCE


@pytest.mark.spu(presets=["spu-8"], seeds=2, overrides={"noise.kappa0": 1e-4})
def test_refinement_gains_a_factor_of_ten(spu_device):
    A, b, x_true = problem()
    one_shot = relative_error(driver.linalg.solve(spu_device, A, b, t=100.0), x_true)
    refined = relative_error(refined_solve(spu_device, A, b), x_true)
    assert refined < one_shot / 10.0


def test_adc_width_where_refinement_misses_its_tolerance():
    """The same check as a hypothesis search over ADC widths 2..16 on spu-8 (device seed fixed, so
    each width's answer is deterministic).  As a ``@given`` test it would fail and print
    ``Falsifying example: ...(spec=SpecVariant('spu-8', overrides={'adc.bits': 4}))``; ``find``
    returns that shrunk counterexample instead, so this test can print it and reason about it."""
    A, b, x_true = problem()

    def misses_tolerance(spec) -> bool:
        with driver.open(spec, seed=0) as dev:
            return relative_error(refined_solve(dev, A, b), x_true) >= TOLERANCE

    specs = device_specs("spu-8", vary={"adc.bits": (2, 16)})
    try:
        worst = find(specs, misses_tolerance, settings=settings(max_examples=30, deadline=None, database=None))
    except NoSuchExample:
        print(f"refined_solve meets {TOLERANCE:g} at every ADC width from 2 to 16 bits")
        return
    bits = worst["adc"]["bits"]
    print(f"shrunk counterexample: {worst!r}: refined_solve misses {TOLERANCE:g} at {bits} ADC bits and below")
    assert bits < ADC_BITS_WE_BUILD_FOR, (
        f"refined_solve needs an ADC wider than {bits} bits; reproduce with driver.open('spu-8', seed=0,"
        f" overrides={worst.overrides!r})"
    )
