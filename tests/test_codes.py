"""driver.codes.to_codes: the vector kernel against the obvious numpy conversion, value for value."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from driver.codes import code_dtype, code_max, to_codes


def _reference(values: np.ndarray, bits: int, full_scale: float):
    """The conversion in numpy: clip v / full_scale to +-1, round to the nearest code (ties to even)."""
    unclipped = values / full_scale
    clipped = int(np.count_nonzero(np.abs(unclipped) > 1.0))
    top = code_max(bits)
    codes = np.rint(np.clip(unclipped, -1.0, 1.0) * top).astype(code_dtype(bits))
    zeroed = int(np.count_nonzero((codes == 0) & (values != 0)))
    error = float(np.abs(unclipped - codes / top).max(initial=0.0))
    return codes, clipped, zeroed, error


_VALUES = st.floats(allow_nan=False, min_value=-1e6, max_value=1e6) | st.sampled_from([0.0, -0.0, np.inf, -np.inf])


@settings(max_examples=300, deadline=None)
@given(
    arrays(np.float64, st.integers(1, 40), elements=_VALUES),
    st.sampled_from([2, 3, 4, 8, 12, 16, 24, 32]),
    st.sampled_from([1.0, 0.7, 2.5, 1e-3]),
)
def test_the_vector_kernel_gives_the_numpy_conversion(values, bits, full_scale):
    q = to_codes(values, bits, full_scale)
    codes, clipped, zeroed, error = _reference(values, bits, full_scale)
    assert q.codes.dtype == codes.dtype and np.array_equal(q.codes, codes)
    assert (q.clipped, q.zeroed) == (clipped, zeroed)
    assert q.max_error == error


def test_ties_round_to_even_and_exact_codes_have_no_error():
    top = code_max(4)  # 7
    values = np.array([0.5, 1.5, 2.5, -0.5, 3.0]) / top
    q = to_codes(values, 4, 1.0)
    assert q.codes.tolist() == [0, 2, 2, 0, 3] and q.zeroed == 2
    assert to_codes(np.array([3.0, -7.0]) / top, 4, 1.0).max_error <= 1e-16


def test_a_nan_is_converted_as_numpy_converts_it():
    values = np.array([0.25, np.nan, -2.0])
    with np.errstate(invalid="ignore"):
        q = to_codes(values, 12, 1.0)
        codes, clipped, zeroed, error = _reference(values, 12, 1.0)
    assert np.array_equal(q.codes, codes) and (q.clipped, q.zeroed) == (clipped, zeroed) and np.isnan(q.max_error)
