"""Thermodynamic natural gradient descent (TNGD, Donatella et al., arXiv 2405.13817): the client.

Framework-neutral: numpy in, numpy out.  One step (the paper's Algorithm 1): the caller computes the
gradient g and the curvature of the batch (a dense F, or the GGN factors J (m, N) and H (m, m)); the
client loads F + lambda I and g onto the SPU, lets it evolve for a time t, reads the state g~ and
updates the parameters with a first-order rule (SGD with momentum, or Adam; Adam with
beta1 = beta2 = 0 is the paper's TNGD-Adam).

What the device computes (eq. 15 and 19).  In the user's units the cell array follows

    dx = -((F + lambda I) x - g) dt + sqrt(2 kappa) dW,

so after a time t from the state it holds, g~_{k-1}, the read-out is (noise aside)

    g~_k = e^{-(F + lambda I) t} (g~_{k-1} - (F + lambda I)^-1 g) + (F + lambda I)^-1 g.      (eq. 19)

Warm start: the state carries over from step to step and starts at the first gradient
(g~_0 = g_1), so t -> 0 gives g~_1 = g_1 (the SGD step) and t -> infinity gives the NGD step
(F + lambda I)^-1 g at every step; in between, g~ mixes the natural gradient of this batch with the
estimate of the previous one.  Note what eq. 19 says for t -> 0 after the first step: the state does
not move, g~_k = g~_{k-1} = g_1, so only the first step is the SGD step.  ``warm_start=False``
re-initialises the state to the gradient at every step instead (t -> 0 is then SGD at every step, at
the cost of a re-initialisation per step, and without the memory that makes small t work well).

The time t.  ``t`` is the t of eq. 19, in the units in which F is given: a mode of F + lambda I with
eigenvalue lambda_i relaxes as e^{-lambda_i t}, so t = 30 / damping is past NGD to e^{-30} in every
mode.  The device runs s * t in units of tau, where s is the matrix scale the driver chose for the
load (user units of F per g0, ``Device.matrix_scale``: max|F + lambda I| / g_max for a dense F,
max(max|J|^2 max|H|, lambda) / g_max for a GGN), so the run takes s * t * tau seconds of analog
time on the hardware (``StepRecord.device_time`` counts it in tau).  J and H go in as a
``driver.GGN`` (N x N never formed) when the device has enough structured rows, else dense.

Delay (eq. 22).  With ``delay`` t_d > 0 the device keeps evolving under the previous F and g for a
time t_d (in the same units as t, on the previous load's scale) before the new ones are loaded, as
it would while the host computes the next gradient and curvature:

    g~_k = e^{-F_k t} (e^{-F_{k-1} t_d} (g~_{k-1} - F_{k-1}^-1 g_{k-1}) + F_{k-1}^-1 g_{k-1} - F_k^-1 g_k) + F_k^-1 g_k,

with F_k standing for F_k + lambda I.  This is the momentum-like effect of the paper's Figs. 4 and 5.

Read-out.  ``readout="state"`` converts the state once at the end of the run (one ADC snapshot);
``readout="mean"`` returns the on-device average of the ADC samples in (burn_in, t] (the device
samples every 1 / sample_rate tau, i.e. every 1 / (s sample_rate) in the units of t), which averages
the noise out at the price of mixing in the transient.

Ranging (how the state is kept in the converters' ranges).  The device stores the state as node
voltages V; the client keeps a fixed state scale r (user units of g~ per volt, ``state_scale``) so
that x = r V means the same thing across loads: the matrix goes in at the driver's scale s and the
gradient at s_b = r s (the readout scale s_b / s = r).  r is chosen so the gradient fits the input
DAC and the state stays within half of the ADC range and the rails, with a factor 2 of headroom.
The device has no command to set its state, so the client sets it through the public API: it loads
a = g_max I (the identity at full scale: a GGN with J = 0 and damping 1, N + 2 codes, or a dense
identity on a device without structured arrays) with input u = g_max x0 / r and runs 40 / g_max tau,
after which V = x0 / r to e^{-40} (plus the array's stationary noise, kappa0 / g_max V^2).  That
happens on the first step (x0 = g_1), when r has to change (the gradient no longer fits the DAC, or
on a quantised device the signal has fallen below 1/32 of the range: x0 is then the present state,
read with one ADC snapshot), and when a run clipped (x0 is the last estimate, the run is repeated at
4 times the scale).  ``state_scale=`` fixes r instead.

Hardware time.  ``StepRecord.hardware_time_s`` sums the device's timing model over the step's calls
(``Device.timeline``: link, element programming, analog time, conversions), re-initialisations and
runs discarded after clipping included.

Noise.  With injected noise kappa0 (V^2 per tau) the user-unit diffusion is kappa = kappa0 r^2 s, so
in the eigenbasis of F + lambda I mode i has variance kappa (1 - e^{-2 lambda_i t}) / lambda_i on
top of its decayed initial spread (tests/test_tngd.py derives it in full).

The digital solvers (``solver="exact" | "cg" | "woodbury"``, see :mod:`driver.ngd`) compute the
damped natural gradient (F + lambda I)^-1 g on the host for side-by-side runs; ``solver="none"``
returns g itself (plain SGD or Adam through the same update code).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ngd
from .device import Device
from .errors import InvalidInputError
from .numbers import real
from .tngd_device import DeviceStep, _Tally

__all__ = ["TNGD", "StepRecord"]

SOLVERS = ("device", "exact", "cg", "woodbury", "none")
BASES = ("sgd", "adam")
READOUTS = ("state", "mean")


@dataclass(frozen=True)
class StepRecord:
    """What one natural-gradient call did and cost.

    solver: the solver used; device_time: analog time run on the device this call, in tau (delay,
    run and any re-initialisation), 0 for the digital solvers; hardware_time_s: the device's
    estimate of what the call's loads, runs and reads take on the hardware its spec describes
    (seconds; NaN for the digital solvers); wall_time_s: host time of the call; matrix_scale: s,
    user units of F per g0 (0 for the digital solvers); state_scale: r, user units of g~ per volt;
    reinitialised: times the state was set by a relaxation run; retries: runs repeated after
    clipping; engine: the engine of the main run ("" when none ran); loads, runs, reads: device
    calls made.
    """

    solver: str
    device_time: float = 0.0
    hardware_time_s: float = math.nan
    wall_time_s: float = 0.0
    matrix_scale: float = 0.0
    state_scale: float = 0.0
    reinitialised: int = 0
    retries: int = 0
    engine: str = ""
    loads: int = 0
    runs: int = 0
    reads: int = 0


class TNGD(DeviceStep):
    """Thermodynamic natural gradient descent on an SPU, or a digital NGD baseline (module docstring).

    TNGD(device, lr, damping, t, delay=0.0, base="sgd", momentum=0.0, readout="state",
         solver="device", cg_iters=200, ...)

    device: an open :class:`driver.Device` (None for the digital solvers); the client owns its state
    between steps, so do not use the device for anything else meanwhile.  lr: learning rate;
    damping: lambda > 0 added to the curvature; t: analog time per step in the units of F (module
    docstring), >= 0, required for solver="device"; delay: t_d >= 0 in the same units; base: "sgd"
    (with ``momentum``) or "adam" (with ``betas``, default (0, 0): TNGD-Adam, and ``eps``);
    readout: "state" (one snapshot) or "mean" (average of the samples after ``burn_in``); solver:
    "device", "exact", "cg" (``cg_iters`` iterations from 0), "woodbury" (needs J, H) or "none"
    (the plain gradient); warm_start: keep the device state between steps (default) or set it to
    the gradient at every step; state_scale: fix the state scale r (user units per volt) instead of
    ranging automatically.

    ``natural_gradient(grad, F=... | J=..., H=...)`` returns g~ (N,); ``step(params, grad, ...)``
    returns the updated parameters (a new array).  ``last_record`` is the StepRecord of the last
    call, ``records`` all of them.
    """

    def __init__(
        self,
        device: Device | None,
        lr: float,
        damping: float,
        t: float | None = None,
        delay: float = 0.0,
        base: str = "sgd",
        momentum: float = 0.0,
        readout: str = "state",
        solver: str = "device",
        cg_iters: int = 200,
        *,
        burn_in: float = 0.0,
        betas: tuple[float, float] = (0.0, 0.0),
        eps: float = 1e-8,
        warm_start: bool = True,
        state_scale: float | None = None,
    ):
        self.solver = _choice(solver, SOLVERS, "solver")
        self.base = _choice(base, BASES, "base")
        self.readout = _choice(readout, READOUTS, "readout")
        self.lr = _number(lr, "lr", positive=True)
        self.damping = _number(damping, "damping", positive=True)
        self.momentum = _fraction(momentum, "momentum")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise InvalidInputError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_fraction(betas[0], "beta1"), _fraction(betas[1], "beta2"))
        self.eps = _number(eps, "eps", positive=True)
        if isinstance(cg_iters, bool) or not isinstance(cg_iters, (int, np.integer)) or cg_iters < 0:
            raise InvalidInputError(f"cg_iters must be a non-negative integer, got {cg_iters!r}")
        self.cg_iters = int(cg_iters)
        self.delay = _number(delay, "delay")
        self.burn_in = _number(burn_in, "burn_in")
        self.warm_start = bool(warm_start)
        self.t = None if t is None else _number(t, "t")
        self.state_scale_fixed = None if state_scale is None else _number(state_scale, "state_scale", positive=True)
        self.device = device
        if self.solver == "device":
            if device is None or not isinstance(device, Device):
                raise InvalidInputError(f"solver='device' needs an open driver.Device, got {device!r}")
            if self.t is None:
                raise InvalidInputError("solver='device' needs the analog time t per step (t >= 0, in the units of F)")
            if self.readout == "mean" and not self.t > self.burn_in:
                raise InvalidInputError(
                    f"readout='mean' averages the samples in (burn_in, t]: needs t > burn_in, got t = {self.t!r},"
                    f" burn_in = {self.burn_in!r}; use readout='state' for t = 0"
                )
            if self.delay > 0.0 and not self.warm_start:
                raise InvalidInputError(
                    "delay > 0 evolves the state carried over from the previous step, which warm_start=False"
                    " discards; use warm_start=True or delay=0"
                )
        elif self.delay > 0.0:
            raise InvalidInputError(f"delay is a property of the device's dynamics; solver={solver!r} has none")
        self.records: list[StepRecord] = []
        self.reset()

    # -- public API ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the optimiser's state: the next step re-initialises the device state to its gradient
        and restarts the momentum / Adam moments."""
        self._state_scale: float | None = self.state_scale_fixed
        self._previous_scale: float | None = None  # s of the load still on the device (for the delay run)
        self._estimate: np.ndarray | None = None  # last g~ read out, user units
        self._n: int | None = None
        self._velocity: np.ndarray | None = None
        self._moment1: np.ndarray | None = None
        self._moment2: np.ndarray | None = None
        self._steps = 0
        # False when the device may not hold the estimate (a restored state, a failed step): the next
        # device step then sets the device state to the estimate before it runs
        self._device_holds_estimate = False

    _STATE_ARRAYS = ("estimate", "velocity", "moment1", "moment2")
    _STATE_SCALARS = ("state_scale", "n", "steps")

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state as plain values (copies): the last estimate g~ (N,), the momentum or
        Adam moments (N,), the step count, the state scale r and the length N; None where unset.

        Hyperparameters are not included: they are the constructor's arguments.
        """
        state: dict[str, Any] = {name: getattr(self, "_" + name) for name in self._STATE_SCALARS}
        for name in self._STATE_ARRAYS:
            value = getattr(self, "_" + name)
            state[name] = None if value is None else np.array(value, dtype=np.float64)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.  The device state is not part of it: the next device step sets
        the device's state to the saved estimate g~ (one relaxation run) and continues from there, on
        this device or a fresh one; the delay run of that step is skipped (the previous load is gone)."""
        if not isinstance(state, dict) or set(state) != set(self._STATE_ARRAYS + self._STATE_SCALARS):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise InvalidInputError(
                f"a TNGD state must be a dict with keys {sorted(self._STATE_ARRAYS + self._STATE_SCALARS)},"
                f" got {keys}; pass what TNGD.state_dict() returned"
            )
        n = state["n"]
        arrays = {}
        for name in self._STATE_ARRAYS:
            value = state[name]
            if value is not None:
                value = ngd._array(value, f"state {name!r}", 1)
                if value.shape[0] != n:
                    raise InvalidInputError(f"state {name!r} has {value.shape[0]} entries but the state's n is {n}")
            arrays[name] = value
        self.reset()
        for name, value in arrays.items():
            setattr(self, "_" + name, None if value is None else value.copy())
        self._n = n
        self._steps = int(state["steps"])
        self._state_scale = self.state_scale_fixed if self.state_scale_fixed is not None else state["state_scale"]

    @property
    def last_record(self) -> StepRecord | None:
        return self.records[-1] if self.records else None

    @property
    def state_scale(self) -> float | None:
        """r: user units of g~ per volt of device state (None before the first device step)."""
        return self._state_scale

    def natural_gradient(self, grad: Any, *, F: Any = None, J: Any = None, H: Any = None) -> np.ndarray:
        """g~ for this batch: the device's read-out (eq. 19) or a digital solve of (F + lambda I) x = g.

        grad (N,); F (N, N) dense symmetric PSD, or J (m, N) and H (m, m) symmetric PSD, without the
        damping (the client adds lambda I).  Returns (N,) float64.  Cost: device loads of F (N^2
        codes) or J, H (m (m + 2N) codes), one run of s t tau, one read; digital see driver.ngd.
        """
        with self._atomic():
            return self._natural_gradient(grad, F, J, H)

    def _natural_gradient(self, grad: Any, F: Any, J: Any, H: Any) -> np.ndarray:
        started = time.perf_counter()
        if self.solver == "none":
            g = ngd._array(grad, "gradient", 1)
            self._check_length(g)
            self._record(StepRecord(solver="none", wall_time_s=time.perf_counter() - started))
            return g.copy()
        g, curv = ngd.curvature(grad, self.damping, F, J, H)
        self._check_length(g)
        if self.solver != "device":
            x = ngd.solve(self.solver, g, curv, iters=self.cg_iters)
            self._record(StepRecord(solver=self.solver, wall_time_s=time.perf_counter() - started))
            return x
        tally = _Tally()
        hardware_before = self.device.timeline.hardware_s  # running total: exact whatever the timeline keeps
        x = self._device_step(g, curv, tally)
        self._record(
            StepRecord(
                solver="device",
                device_time=tally.device_time,
                hardware_time_s=self.device.timeline.hardware_s - hardware_before,
                wall_time_s=time.perf_counter() - started,
                matrix_scale=self._previous_scale or 0.0,
                state_scale=self._state_scale or 0.0,
                reinitialised=tally.reinitialised,
                retries=tally.retries,
                engine=tally.engine,
                loads=tally.loads,
                runs=tally.runs,
                reads=tally.reads,
            )
        )
        return x

    def step(self, params: Any, grad: Any, *, F: Any = None, J: Any = None, H: Any = None) -> np.ndarray:
        """One optimiser step: theta - lr * update(g~), g~ = natural_gradient(grad, ...).  Returns a new (N,) array.

        base "sgd": v = momentum v + g~, theta -= lr v.  base "adam": m = b1 m + (1 - b1) g~,
        v = b2 v + (1 - b2) g~^2, theta -= lr m_hat / (sqrt(v_hat) + eps) with bias correction.
        """
        theta = ngd._array(params, "params", 1)
        g = ngd._array(grad, "gradient", 1)
        if theta.shape != g.shape:
            raise InvalidInputError(
                f"params have shape {theta.shape} but the gradient has {g.shape}; they must have the same length"
            )
        with self._atomic():
            return self._update(theta, self._natural_gradient(g, F, J, H))

    def _update(self, theta: np.ndarray, direction: np.ndarray) -> np.ndarray:
        self._steps += 1
        if self.base == "sgd":
            if self.momentum > 0.0:
                self._velocity = direction if self._velocity is None else self.momentum * self._velocity + direction
                direction = self._velocity
            return theta - self.lr * direction
        b1, b2 = self.betas
        if self._moment1 is None:
            self._moment1 = np.zeros_like(direction)
            self._moment2 = np.zeros_like(direction)
        self._moment1 = b1 * self._moment1 + (1.0 - b1) * direction
        self._moment2 = b2 * self._moment2 + (1.0 - b2) * direction**2
        m_hat = self._moment1 / (1.0 - b1**self._steps)
        v_hat = self._moment2 / (1.0 - b2**self._steps)
        return theta - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """A call that fails leaves the optimiser's state as it was.  If it reached the device, the device
        state is no longer the continuation of the estimate: the next step sets it to the estimate first."""
        saved = self.state_dict()
        previous_scale, holds = self._previous_scale, self._device_holds_estimate
        calls = self.device.timeline.calls if self.solver == "device" else 0
        try:
            yield
        except BaseException:
            self.load_state_dict(saved)
            self._previous_scale = previous_scale
            self._device_holds_estimate = holds and (self.solver != "device" or self.device.timeline.calls == calls)
            raise

    # -- helpers ---------------------------------------------------------------------------------------
    def _check_length(self, g: np.ndarray) -> None:
        if self._n is None:
            self._n = g.shape[0]
        elif g.shape[0] != self._n:
            raise InvalidInputError(
                f"the gradient has {g.shape[0]} entries but this optimiser's previous steps had {self._n};"
                " call reset() before changing the number of parameters"
            )

    def _record(self, record: StepRecord) -> None:
        self.records.append(record)


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise InvalidInputError(f"{what} = {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def _number(value: Any, what: str, positive: bool = False) -> float:
    value = real(value, what)
    if not math.isfinite(value) or value < 0.0 or (positive and value == 0.0):
        bound = "positive" if positive else "non-negative"
        raise InvalidInputError(f"{what} must be {bound} and finite, got {value!r}")
    return value


def _fraction(value: Any, what: str) -> float:
    value = _number(value, what)
    if not value < 1.0:
        raise InvalidInputError(f"{what} must be in [0, 1), got {value!r}")
    return value
