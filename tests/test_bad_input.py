"""Bad input is refused with the documented error, a message that names the problem, and no side effect.

Every refusal is checked the same way (DESIGN section 5): a device is set up with a good
load and run, its read_mean(), status() and analog state are recorded, the bad call must
raise, and afterwards the three are bit-identical and the next good run gives the same
bits as a twin device (same spec and seed) that never saw the bad call.

The whole module runs twice: with the device in this process, and with it served over
loopback TCP (tests/served.py), where the refusals then come through the wire.  The twin
is always in-process, so the TCP pass also checks that both give the same bits.  The
analog state itself is only visible in-process; over TCP the twin's next run stands in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from served import current_transport, open_under_test, transport  # noqa: F401 (transport: a fixture)

import driver

SPEC, SEED = "spu-8", 11
CELLS = 8  # of spu-8
MAX_RUN_TIME = 1.0e6  # of spu-8
# a well-conditioned SPD system that runs cleanly on spu-8: b along A's top eigenvector, so with b at the
# DAC's full scale (2.048 V) the nodes settle at |V| <= 2.048 max|A_ij| / 3 = 1.7 V, inside rails and ADC range
_Q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((4, 4)))
GOOD_A = _Q @ np.diag([3.0, 2.5, 2.0, 1.5]) @ _Q.T
GOOD_A = 0.5 * (GOOD_A + GOOD_A.T)
GOOD_B = GOOD_A @ _Q[:, 0]

PROPERTY = settings(max_examples=30, deadline=None)


# The property tests run the transient engine (microseconds for 4 cells); test_no_trace_on_each_engine
# repeats a few refusals with every engine.
ENGINE = "transient"


def _open(spec: str = SPEC, seed: int = SEED) -> driver.Device:
    """The device under test, over this pass's transport (the imported ``transport`` fixture)."""
    return open_under_test(spec, seed)


def _prepared(spec: str = SPEC, seed: int = SEED, engine: str = ENGINE, twin: bool = False) -> driver.Device:
    dev = driver.open(spec, seed=seed) if twin else _open(spec, seed)
    dev.load_matrix(GOOD_A)
    dev.load_vector(GOOD_B)
    dev.run(t=20.0, burn_in=10.0, engine=engine)
    return dev


def _good_run(dev: driver.Device, engine: str = ENGINE) -> driver.RunReport:
    return dev.run(t=5.0, burn_in=2.0, engine=engine)


def _reload_and_run(dev: driver.Device, engine: str = ENGINE) -> driver.RunReport:
    dev.load_matrix(GOOD_A)
    dev.load_vector(GOOD_B)
    return _good_run(dev, engine)


def _analog(dev: driver.Device) -> np.ndarray:
    """The node voltages of an in-process device; empty over TCP, where only the protocol is seen."""
    firmware = getattr(dev.transport, "firmware", None)
    return np.empty(0) if firmware is None else firmware.analog_state()


def _snapshot(dev: driver.Device) -> tuple[np.ndarray, driver.DeviceStatus, np.ndarray]:
    return dev.read_mean(), dev.status(), _analog(dev)


def _same_bits(x: np.ndarray, y: np.ndarray) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _fields(report: driver.RunReport) -> dict:
    out = dataclasses.asdict(report)
    out.pop("wall_time_s")
    return out


def _refused(
    bad: Callable[[driver.Device], object],
    error: type[Exception],
    pattern: str,
    *,
    spec: str = SPEC,
    setup: Callable[[driver.Device], object] | None = None,
    then: Callable[[driver.Device, str], driver.RunReport] = _good_run,
    engine: str = ENGINE,
) -> Exception:
    """Check that ``bad(dev)`` raises ``error`` matching ``pattern`` and leaves no trace.

    ``setup`` runs on the device and its twin after the good load + run; ``then`` is the
    good call made on both afterwards, with ``engine``.  Returns the exception.
    """
    dev, twin = _prepared(spec, engine=engine), _prepared(spec, engine=engine, twin=True)
    try:
        if setup is not None:
            setup(dev)
            setup(twin)
        mean, status, analog = _snapshot(dev)
        with pytest.raises(error, match=pattern) as caught:
            bad(dev)
        mean_after, status_after, analog_after = _snapshot(dev)
        assert _same_bits(mean_after, mean)
        assert status_after == status
        assert _same_bits(analog_after, analog)
        report, twin_report = then(dev, engine), then(twin, engine)
        assert _fields(report) == _fields(twin_report)
        assert _same_bits(dev.read_mean(), twin.read_mean())
        if current_transport() == "in-process":
            assert _same_bits(_analog(dev), _analog(twin))
        assert dev.status() == twin.status()
    finally:
        dev.close()
        twin.close()
    return caught.value


def _spd(rng: np.random.Generator, n: int, low: float = 1.0, high: float = 3.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(rng.uniform(low, high, n)) @ q.T
    return 0.5 * (a + a.T)


# -- the error classes ------------------------------------------------------------------


def test_error_hierarchy():
    """InvalidInputError and SpecError are ValueErrors; the others sit under SpuError as documented."""
    assert issubclass(driver.InvalidInputError, ValueError)
    assert issubclass(driver.SpecError, driver.InvalidInputError)
    assert issubclass(driver.DeviceClosedError, driver.DeviceStateError)
    assert issubclass(driver.SaturationError, driver.SpuError)
    for cls in (driver.InvalidInputError, driver.DeviceStateError, driver.DeviceBusyError, driver.ProtocolError):
        assert issubclass(cls, driver.SpuError)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0", np.float64(3.0)])
def test_open_refuses_bad_seed(seed):
    with pytest.raises(driver.InvalidInputError, match="seed"):
        driver.open(SPEC, seed=seed)


# -- matrix and vector shapes --------------------------------------------------------------

_bad_matrix_shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 6)),
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.integers(0, 6), st.integers(0, 6)).filter(lambda s: s[0] != s[1] or s[0] == 0),
)


@PROPERTY
@given(shape=_bad_matrix_shapes, as_list=st.booleans())
def test_matrix_of_wrong_shape(shape, as_list):
    """0-d, 1-d, 3-d, non-square and empty matrices are refused, naming the shape."""
    value = np.ones(shape)
    if as_list:
        value = value.tolist()
    error = _refused(lambda dev: dev.load_matrix(value), driver.InvalidInputError, r"dimension|square|non-empty")
    assert isinstance(error, ValueError)
    assert str(np.shape(value)) in str(error)


@PROPERTY
@given(shape=st.one_of(st.just(()), st.just((0,)), st.lists(st.integers(0, 3), min_size=2, max_size=3).map(tuple)))
def test_vector_of_wrong_shape(shape):
    """0-d, 2-d, 3-d and empty vectors are refused."""
    error = _refused(lambda dev: dev.load_vector(np.ones(shape)), driver.InvalidInputError, r"vector b")
    assert re.search(r"dimension|non-empty", str(error))


_BAD_VALUES = {
    "strings": [["a", "b"], ["c", "d"]],
    "numeric strings": np.array([["1", "0"], ["0", "1"]]),
    "complex": np.eye(2) * (1 + 1j),
    "complex, zero imaginary part": np.eye(2).astype(complex),
    "ragged": [[1.0, 2.0], [3.0]],
    "objects": np.array([[1.0, None], [None, 1.0]]),
    "integers beyond int64": [[10**30, 0], [0, 1]],
    "a dict": {"a": 1},
    "datetimes": np.array([["2020-01-01", "2020-01-02"]] * 2, dtype="datetime64[D]"),
    "bytes": np.array([[b"a", b"b"], [b"c", b"d"]]),
}


@pytest.mark.parametrize("what", list(_BAD_VALUES))
def test_matrix_of_wrong_dtype(what):
    """Anything that is not an array of real numbers is refused, naming what was seen."""
    value = _BAD_VALUES[what]
    _refused(lambda dev: dev.load_matrix(value), driver.InvalidInputError, r"matrix A .*(real numbers|array)")


@pytest.mark.parametrize("what", ["strings", "complex", "ragged", "objects"])
def test_vector_of_wrong_dtype(what):
    value = {
        "strings": ["a", "b"],
        "complex": np.array([1.0, 2.0j]),
        "ragged": [[1.0], [2.0, 3.0]],
        "objects": np.array([1.0, None]),
    }[what]
    _refused(lambda dev: dev.load_vector(value), driver.InvalidInputError, r"vector b .*(real numbers|array)")


def test_boolean_and_integer_arrays_are_numbers():
    """bool and int arrays are real numbers: accepted and converted to float."""
    with _open() as dev:
        dev.load_matrix(np.eye(3, dtype=int) * 2)
        dev.load_vector(np.array([True, False, True]))
        dev.run(t=20.0, burn_in=10.0)
        x = dev.read_mean()
    assert x.shape == (3,) and x.dtype == np.float64


@PROPERTY
@given(n=st.integers(CELLS + 1, 3 * CELLS))
def test_larger_than_the_device(n):
    """n above the cell count is refused for the matrix and the vector, naming both numbers."""
    pattern = rf"size {n}.*{CELLS} cells"
    _refused(lambda dev: dev.load_matrix(np.eye(n)), driver.InvalidInputError, pattern)
    _refused(lambda dev: dev.load_vector(np.ones(n)), driver.InvalidInputError, pattern)


def test_larger_than_the_ideal_device():
    with _open("ideal", 0) as dev:
        cells = dev.info.cells
        with pytest.raises(driver.InvalidInputError, match=rf"size {cells + 1}.*{cells} cells"):
            dev.load_vector(np.ones(cells + 1))
        assert dev.status().vector_n == 0


# -- NaN and inf ------------------------------------------------------------------------

_non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


@PROPERTY
@given(n=st.integers(1, CELLS), data=st.data(), value=_non_finite, mirrored=st.booleans())
def test_non_finite_matrix(n, data, value, mirrored):
    """A NaN or inf anywhere in A is refused, with its position."""
    i = data.draw(st.integers(0, n - 1), label="i")
    j = data.draw(st.integers(0, n - 1), label="j")
    a = np.eye(n)
    a[i, j] = value
    if mirrored:
        a[j, i] = value
    first = tuple(int(k) for k in np.argwhere(~np.isfinite(a))[0])
    error = _refused(lambda dev: dev.load_matrix(a), driver.InvalidInputError, r"NaN or infinite")
    assert str(first) in str(error)


@PROPERTY
@given(n=st.integers(1, CELLS), data=st.data(), value=_non_finite)
def test_non_finite_vector(n, data, value):
    i = data.draw(st.integers(0, n - 1), label="i")
    b = np.ones(n)
    b[i] = value
    error = _refused(lambda dev: dev.load_vector(b), driver.InvalidInputError, r"NaN or infinite")
    assert f"({i},)" in str(error)


# -- symmetry -----------------------------------------------------------------------------

_RTOL = 1e-10  # driver.device.SYMMETRY_RTOL: |A - A.T| up to this fraction of max |A| is round-off


@PROPERTY
@given(
    n=st.integers(2, CELLS),
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-6, 6),
    log_rel=st.floats(-8, 0),
    data=st.data(),
)
def test_non_symmetric_matrix(n, seed, log_scale, log_rel, data):
    """An asymmetry beyond the relative tolerance is refused, naming the size and place."""
    i = data.draw(st.integers(0, n - 1), label="i")
    j = data.draw(st.integers(0, n - 1).filter(lambda k: k != i), label="j")
    a = _spd(np.random.default_rng(seed), n) * 10.0**log_scale
    a[i, j] += 10.0**log_rel * np.abs(a).max()  # > 100 x the tolerance
    error = _refused(lambda dev: dev.load_matrix(a), driver.InvalidInputError, r"symmetric")
    assert f"at {(i, j)}" in str(error) or f"at {(j, i)}" in str(error)
    assert "symmetric=False" in str(error)


@PROPERTY
@given(n=st.integers(2, CELLS), seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-6, 6))
def test_asymmetry_within_round_off_is_accepted(n, seed, log_scale):
    """|A - A.T| below the tolerance (round-off of Q D Q^T and the like) loads fine."""
    rng = np.random.default_rng(seed)
    a = _spd(rng, n) * 10.0**log_scale
    a[0, 1] += 0.1 * _RTOL * np.abs(a).max()
    with _open() as dev:
        dev.load_matrix(a)
        assert dev.status().matrix_n == n


def test_non_symmetric_matrix_loads_when_asked():
    """symmetric=False is the documented way to load a non-symmetric drift."""
    a = GOOD_A.copy()
    a[0, 1] += 0.1
    with _open() as dev:
        dev.load_matrix(a, symmetric=False)
        assert dev.status().matrix_loaded


# -- run arguments ----------------------------------------------------------------------------

_not_a_number = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5), st.lists(st.floats(0.5, 10), min_size=1, max_size=2)
)


@PROPERTY
@given(
    t=st.one_of(
        st.floats(max_value=0.0, allow_nan=False),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.floats(min_value=MAX_RUN_TIME, exclude_min=True, allow_infinity=False),
        _not_a_number,
    )
)
def test_bad_run_time(t):
    """t <= 0, NaN, inf, beyond max_run_time, or not a number is refused, naming t."""
    error = _refused(lambda dev: dev.run(t), driver.InvalidInputError, r"\bt\b( =| must)")
    if isinstance(t, float) and math.isfinite(t):
        assert repr(t) in str(error)


@PROPERTY
@given(
    burn_in=st.one_of(
        st.floats(max_value=0.0, exclude_max=True, allow_nan=False).filter(lambda x: x < 0.0),
        st.floats(min_value=10.0, allow_nan=False),
        st.just(math.nan),
        _not_a_number.filter(lambda value: value is not None),  # None is the default: t / 2
    )
)
def test_bad_burn_in(burn_in):
    """burn_in < 0, >= t, NaN or not a number is refused, naming burn_in."""
    _refused(lambda dev: dev.run(10.0, burn_in), driver.InvalidInputError, r"burn_in")


_engines = ("auto", "transient", "exact")


@PROPERTY
@given(name=st.one_of(st.text(max_size=12), st.integers(), st.none()).filter(lambda s: s not in _engines))
def test_bad_engine_name(name):
    error = _refused(lambda dev: dev.run(10.0, engine=name), driver.InvalidInputError, r"engine")
    assert "'auto'" in str(error)


@PROPERTY
@given(name=st.one_of(st.text(max_size=12), st.integers(), st.none()).filter(lambda s: s not in ("raise", "flag")))
def test_bad_on_saturation_name(name):
    error = _refused(lambda dev: dev.run(10.0, on_saturation=name), driver.InvalidInputError, r"on_saturation")
    assert "'flag'" in str(error)


_bad_scales = st.one_of(
    st.floats(max_value=0.0, allow_nan=False),
    st.sampled_from([math.nan, math.inf]),
    st.booleans(),
    st.text(max_size=5),
)


@PROPERTY
@given(scale=_bad_scales, which=st.sampled_from(["matrix", "vector"]))
def test_bad_scale(scale, which):
    """A scale that is not a positive finite number is refused, and the old scale stays."""
    if which == "matrix":
        _refused(lambda dev: dev.load_matrix(GOOD_A, scale=scale), driver.InvalidInputError, r"scale of matrix A")
    else:
        _refused(lambda dev: dev.load_vector(GOOD_B, scale=scale), driver.InvalidInputError, r"scale of vector b")


_REPRESENTATIVE = {
    "matrix shape": (lambda dev: dev.load_matrix(np.ones((2, 3))), driver.InvalidInputError, "square"),
    "matrix NaN": (lambda dev: dev.load_matrix(np.full((3, 3), math.nan)), driver.InvalidInputError, "NaN"),
    "asymmetric": (lambda dev: dev.load_matrix(np.triu(np.ones((3, 3)))), driver.InvalidInputError, "symmetric"),
    "too big": (lambda dev: dev.load_vector(np.ones(CELLS + 1)), driver.InvalidInputError, "cells"),
    "vector scale": (lambda dev: dev.load_vector(GOOD_B, scale=-1.0), driver.InvalidInputError, "scale"),
    "t": (lambda dev: dev.run(-1.0), driver.InvalidInputError, "t ="),
    "burn_in": (lambda dev: dev.run(5.0, 5.0), driver.InvalidInputError, "burn_in"),
    "engine": (lambda dev: dev.run(5.0, engine="fast"), driver.InvalidInputError, "engine"),
}


@pytest.mark.parametrize("engine", ["auto", "exact", "transient"])
@pytest.mark.parametrize("case", list(_REPRESENTATIVE))
def test_no_trace_on_each_engine(case, engine):
    """A refused call leaves no trace whichever engine ran before and after it."""
    bad, error, pattern = _REPRESENTATIVE[case]
    _refused(bad, error, pattern, engine=engine)


# -- calls in the wrong state -------------------------------------------------------------------


@pytest.mark.parametrize("read", ["read_mean", "read_state"])
@pytest.mark.parametrize("loaded", [False, True])
def test_read_before_run(read, loaded):
    """Reading before any run is a state error; nothing changes, and a later run matches a twin."""
    dev, twin = _open(), driver.open(SPEC, seed=SEED)
    try:
        for d in (dev, twin):
            if loaded:
                d.load_matrix(GOOD_A)
                d.load_vector(GOOD_B)
        status, analog = dev.status(), _analog(dev)
        with pytest.raises(driver.DeviceStateError, match=r"(?i)run") as caught:
            getattr(dev, read)()
        assert not isinstance(caught.value, driver.DeviceClosedError)
        assert dev.status() == status
        assert _same_bits(_analog(dev), analog)
        assert _fields(_reload_and_run(dev)) == _fields(_reload_and_run(twin))
        assert _same_bits(dev.read_mean(), twin.read_mean())
    finally:
        dev.close()
        twin.close()


@pytest.mark.parametrize("engine", ["auto", "exact", "transient"])
def test_read_mean_after_a_run_without_samples(engine):
    """A run shorter than one ADC period is allowed but takes no samples: read_mean says so."""
    with _open() as dev:
        dev.load_matrix(GOOD_A)
        dev.load_vector(GOOD_B)
        report = dev.run(0.05, 0.0, engine=engine)  # spu-8 samples every 0.1 tau
        assert report.samples == 0
        with pytest.raises(driver.DeviceStateError, match="no ADC samples"):
            dev.read_mean()
        assert dev.read_state().shape == (4,)


@pytest.mark.parametrize("loads", ["nothing", "matrix", "vector"])
def test_run_before_loads(loads):
    """run() needs both a matrix and a vector: a state error that says what to load."""
    with _open() as dev:
        if loads == "matrix":
            dev.load_matrix(GOOD_A)
        if loads == "vector":
            dev.load_vector(GOOD_B)
        status = dev.status()
        with pytest.raises(driver.DeviceStateError, match=r"load"):
            dev.run(10.0)
        assert dev.status() == status
        assert not dev.status().has_run


@pytest.mark.parametrize("n_vector", [1, 3, 5, CELLS])
def test_vector_length_differs_from_matrix_at_run(n_vector):
    """Loading a vector of another length works, but run() then refuses, naming both sizes."""
    error = _refused(
        lambda dev: dev.run(10.0),
        driver.DeviceStateError,
        rf"{GOOD_A.shape[0]}x{GOOD_A.shape[0]}.*{n_vector}",
        setup=lambda dev: dev.load_vector(np.ones(n_vector)),
        then=_reload_and_run,
    )
    assert not isinstance(error, driver.DeviceClosedError)


_AFTER_CLOSE = {
    "load_matrix": lambda dev: dev.load_matrix(GOOD_A),
    "load_vector": lambda dev: dev.load_vector(GOOD_B),
    "run": lambda dev: dev.run(10.0),
    "read_mean": lambda dev: dev.read_mean(),
    "read_state": lambda dev: dev.read_state(),
    "status": lambda dev: dev.status(),
    "reset": lambda dev: dev.reset(),
    "linalg.solve": lambda dev: driver.linalg.solve(dev, GOOD_A, GOOD_B),
}


@pytest.mark.parametrize("call", list(_AFTER_CLOSE))
def test_calls_after_close(call):
    """Every call after close() raises DeviceClosedError; closing twice is fine."""
    dev = _prepared()
    dev.close()
    dev.close()
    assert dev.closed
    with pytest.raises(driver.DeviceClosedError, match="closed"):
        _AFTER_CLOSE[call](dev)


def test_run_after_close_without_loads():
    dev = _open()
    dev.close()
    with pytest.raises(driver.DeviceClosedError):
        dev.run(10.0)


def test_bad_input_after_close_still_says_closed():
    dev = _open()
    dev.close()
    with pytest.raises(driver.DeviceClosedError):
        dev.load_matrix(np.ones(3))


# -- matrices that are not positive definite --------------------------------------------------------


def _indefinite(rng: np.random.Generator, n: int) -> np.ndarray:
    """A symmetric A, max |eigenvalue| 1, with at least one eigenvalue <= -0.2.

    The device programs a = A / max|A_ij| and max|A_ij| <= ||A||_2 = 1, so a has an
    eigenvalue <= -0.2: the array grows at least as e^{0.2 t}.
    """
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(0.2, 1.0, n) * rng.choice([-1.0, 1.0], n)
    eig[0] = -rng.uniform(0.2, 1.0)
    eig /= np.abs(eig).max()
    a = q @ np.diag(eig) @ q.T
    return 0.5 * (a + a.T)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, CELLS), seed=st.integers(0, 2**32 - 1), engine=st.sampled_from(["auto", "exact", "transient"]))
def test_not_positive_definite_saturates_on_rails(n, seed, engine):
    """On spu-8 (rails) a non-PD matrix saturates within t = 100 (e^20 growth), or the exact engine sees the
    unstable drift: SaturationError, and the run is discarded."""
    a = _indefinite(np.random.default_rng(seed), n)
    b = np.random.default_rng(seed + 1).standard_normal(n)

    def setup(dev):
        dev.load_matrix(a)
        dev.load_vector(b)

    error = _refused(
        lambda dev: dev.run(100.0, 50.0, engine=engine),
        driver.SaturationError,
        r"rail|ran away|unstable",
        setup=setup,
        then=_reload_and_run,
    )
    assert isinstance(error, driver.SpuError)
    assert "positive definite" in str(error)


def test_saturation_flag_keeps_the_run():
    """on_saturation='flag' keeps a saturated run and says so in the report and the status."""
    a = -np.eye(3)
    with _open() as dev:
        dev.load_matrix(a)
        dev.load_vector(np.ones(3))
        report = dev.run(50.0, 25.0, engine="transient", on_saturation="flag")
        assert report.saturated
        assert dev.status().saturated and dev.status().has_run
        assert np.all(np.isfinite(dev.read_mean()))


def test_violent_runaway_on_ideal_is_detected():
    """Without rails, a strongly unstable array (eigenvalue -8 of a) is caught as a runaway."""
    error = _refused(
        lambda dev: dev.run(200.0, 100.0),
        driver.SaturationError,
        r"ran away|unstable",
        spec="ideal",
        setup=lambda dev: (dev.load_matrix(-np.ones((8, 8))), dev.load_vector(np.ones(8))),
        then=_reload_and_run,
    )
    assert "positive definite" in str(error)


@pytest.mark.parametrize("engine", ["exact", "transient"])
def test_runaway_message_does_not_offer_flag(engine):
    """A runaway always raises (Device.run docstring), so its message must not advise on_saturation='flag'."""
    with _open("ideal", 0) as dev:
        dev.load_matrix(-np.ones((8, 8)))
        dev.load_vector(np.ones(8))
        with pytest.raises(driver.SaturationError) as caught:
            dev.run(200.0, 100.0, engine=engine, on_saturation="flag")
    assert "flag" not in str(caught.value)


@pytest.mark.parametrize(
    "engine",
    [
        "exact",
        "transient",
        "auto",
    ],
)
@pytest.mark.parametrize(
    "a",
    [np.diag([1.0, -1.0]), -np.eye(3), np.diag([1.0, -0.2]), np.diag([1.0, 0.0]), np.zeros((2, 2))],
    ids=["diag(1,-1)", "-I", "diag(1,-0.2)", "diag(1,0)", "zero"],
)
def test_not_positive_definite_on_ideal_raises(engine, a):
    """The ideal preset (no rails) must also refuse a non-PD matrix at t = 200 rather than return garbage."""
    n = a.shape[0]
    _refused(
        lambda dev: dev.run(200.0, 100.0, engine=engine),
        driver.SaturationError,
        r"ran away|unstable|rail",
        spec="ideal",
        setup=lambda dev: (dev.load_matrix(a), dev.load_vector(np.ones(n))),
        then=_reload_and_run,
    )


def test_linalg_solve_refuses_not_positive_definite_on_rails():
    with _open() as dev:
        with pytest.raises(driver.SaturationError, match="positive definite"):
            driver.linalg.solve(dev, np.diag([1.0, -1.0]), np.ones(2))


def test_linalg_solve_refuses_not_positive_definite_on_ideal():
    with _open("ideal", 0) as dev:
        with pytest.raises(driver.SaturationError):
            driver.linalg.solve(dev, np.diag([1.0, -1.0]), np.ones(2))
