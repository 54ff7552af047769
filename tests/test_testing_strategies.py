"""Hypothesis strategies of driver.testing: device_specs, devices, spd_matrices.

Every draw must load and stay inside the schema's ranges and the asked ranges; shrinking must go
toward the base spec (a field that does not matter drops out of the overrides, one that does stops at
the edge of the failing region); bad requests are refused with the field named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import driver
from driver.testing import SpecVariant, device_specs, devices, spd_matrices

VARY = {
    "adc.bits": (0, 16),  # includes 1, which the schema forbids, and 0 (continuous)
    "coupling.mismatch": (0.0, 0.05),
    "noise.kappa0": (1e-8, 1e-3),
    "noise.johnson": [False, True],
    "cells.kind": ["rc", "oscillator"],
}
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEARCH = settings(max_examples=200, deadline=None, database=None)


@FAST
@given(spec=device_specs("spu-8", vary=VARY))
def test_every_drawn_spec_loads_inside_the_ranges(spec):
    assert isinstance(spec, SpecVariant) and spec.base == "spu-8"
    with driver.open(spec, seed=0) as dev:
        assert dev.info.spec == dict(spec)
    with spec.open(seed=0) as dev:  # the short form opens the same device
        assert dev.info.spec == dict(spec)
    bits, kappa0 = spec["adc"]["bits"], spec["noise"]["kappa0"]
    assert 0 <= bits <= 16 and bits != 1
    assert 0.0 <= spec["coupling"]["mismatch"] <= 0.05 and 1e-8 <= kappa0 <= 1e-3
    base = driver.transport.effective_spec("spu-8")
    for path, value in spec.overrides.items():  # overrides are exactly the fields that differ from the base
        section, key = path.split(".")
        assert spec[section][key] == value != base[section][key]
    assert spec["dac"] == base["dac"] and spec["timing"] == base["timing"]


def test_shrinking_goes_toward_the_base_spec():
    specs = device_specs(
        "spu-8", vary={"adc.bits": (4, 16), "noise.kappa0": (1e-8, 1e-3), "noise.johnson": [False, True]}
    )
    assert find(specs, lambda spec: True, settings=SEARCH).overrides == {}
    # a field that matters stops at the failing value nearest the base (12 bits); the others go back to it
    assert find(specs, lambda s: s["adc"]["bits"] < 9, settings=SEARCH).overrides == {"adc.bits": 8}


@pytest.mark.parametrize(
    ("vary", "fails", "check"),
    [
        ({"adc.bits": (0, 16)}, lambda s: 0 < s["adc"]["bits"] < 3, lambda o: o == {"adc.bits": 2}),
        (
            {"noise.kappa0": (1e-8, 1e-3)},  # log space, base 1e-5
            lambda s: s["noise"]["kappa0"] > 1e-4,
            lambda o: math.isclose(o["noise.kappa0"], 1e-4, rel_tol=1e-4),
        ),
        (
            {"coupling.mismatch": (0.0, 0.05)},  # linear, base 0.01
            lambda s: s["coupling"]["mismatch"] < 0.004,
            lambda o: 0.0039 < o["coupling.mismatch"] < 0.004,
        ),
        (
            {"cells.kind": ["rc", "oscillator"]},
            lambda s: s["cells"]["kind"] != "rc",
            lambda o: o == {"cells.kind": "oscillator"},
        ),
    ],
)
def test_each_kind_of_field_shrinks_to_the_edge_nearest_the_base(vary, fails, check):
    found = find(device_specs("spu-8", vary=vary), fails, settings=SEARCH)
    assert list(found.overrides) == list(vary) and check(found.overrides)
    assert repr(found) == f"SpecVariant('spu-8', overrides={found.overrides!r})"


def test_a_base_outside_the_range_shrinks_to_the_nearest_end():
    specs = device_specs("ideal", vary={"adc.bits": (6, 10), "noise.kappa0": (1e-6, 1e-4)})
    found = find(specs, lambda spec: True, settings=SEARCH)
    assert found.overrides == {"adc.bits": 6, "noise.kappa0": 1e-6}


@settings(max_examples=60, deadline=None)
@given(spec=device_specs("spu-8", vary={"adc.bits": (0, 3), "dac.bits": [0, 2, 12]}))
def test_values_the_schema_forbids_are_never_drawn(spec):
    assert spec["adc"]["bits"] in (0, 2, 3) and spec["dac"]["bits"] in (0, 2, 12)


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        ({"adc.bitz": (8, 12)}, "no such field; the fields of adc are"),
        ({"adc.bits": (8, 40)}, "field adc.bits = 40 is above its maximum 32"),
        ({"timing.r0_ohm": (0.0, 10.0)}, "field timing.r0_ohm = 0.0 must be greater than 0"),
        ({"adc.bits": (8.0, 12.0)}, "field adc.bits must be an integer, got 8.0"),
        ({"adc.bits": (12, 8)}, "range (12, 8) has low > high"),
        ({"noise.johnson": (False, True)}, "a boolean field varies by a list"),
        ({"cells.kind": ["rc", "lc"]}, "field cells.kind = 'lc' is not one of rc, oscillator"),
        ({"adc.bits": []}, "an empty list of values"),
    ],
)
def test_requests_the_schema_refuses_name_the_field(vary, message):
    with pytest.raises(driver.SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        device_specs("spu-8", vary=vary)


def test_a_bad_base_is_refused_at_once():
    with pytest.raises(driver.SpecError, match="no preset or file named 'spu-9'"):
        device_specs("spu-9")


def test_a_strategy_may_give_a_field_its_values():
    specs = device_specs("spu-8", vary={"adc.bits": st.sampled_from([10, 14])})
    assert find(specs, lambda spec: True, settings=SEARCH).overrides == {"adc.bits": 10}


OPENED: list = []


@FAST
@given(dev=devices("spu-8", vary={"adc.bits": (6, 14)}, seeds=[2, 5]))
def test_devices_are_open_while_their_example_runs(dev):
    OPENED.append(dev)
    assert not dev.closed and dev.info.seed_entropy in ("2", "5") and 6 <= dev.info.adc_bits <= 14
    assert all(other.closed for other in OPENED[:-1])  # each example's device is closed when it ends
    with eval(repr(dev), {"driver": driver}) as again:  # its repr opens the same device
        assert again.info.spec == dev.info.spec and again.info.seed_entropy == dev.info.seed_entropy


def test_devices_shrink_to_the_failing_spec_nearest_the_base_and_seed_zero():
    found = []

    def fails(dev):
        found.append(dev)
        return dev.info.adc_bits < 10

    dev = find(devices("spu-8", vary={"adc.bits": (4, 16)}), fails, settings=SEARCH)
    assert repr(dev) == "driver.open('spu-8', seed=0, overrides={'adc.bits': 9})"
    assert all(other.closed for other in found)
    with pytest.raises(driver.InvalidInputError, match="a seed is an integer"):
        devices("spu-8", seeds=-1)


@FAST
@given(A=spd_matrices(n=(1, 12), cond=(1.0, 1e4)), B=spd_matrices(5, cond=100.0))
def test_spd_matrices_are_symmetric_positive_definite_of_the_asked_condition(A, B):
    assert A.dtype == np.float64 and 1 <= A.shape[0] <= 12 and A.shape[0] == A.shape[1]
    assert np.array_equal(A, A.T) and np.array_equal(B, B.T) and B.shape == (5, 5)
    eigenvalues = np.linalg.eigvalsh(A)
    assert eigenvalues[0] > 0 and eigenvalues[-1] / eigenvalues[0] <= 1e4 * (1 + 1e-8)
    assert np.allclose(np.linalg.eigvalsh(B)[[0, -1]], [1.0, 100.0], rtol=1e-9)


def test_spd_matrices_shrink_to_the_smallest_and_best_conditioned_failure():
    A = find(spd_matrices(n=(2, 10), cond=(1.0, 1e3)), lambda A: np.linalg.cond(A) > 50.0, settings=SEARCH)
    assert A.shape == (2, 2) and 50.0 < np.linalg.cond(A) < 51.0
    with pytest.raises(driver.InvalidInputError, match="cond=0.5"):
        spd_matrices(4, cond=0.5)
    with pytest.raises(driver.InvalidInputError, match="n=0"):
        spd_matrices(0)
