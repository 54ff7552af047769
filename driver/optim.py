"""TNGD in PyTorch: the GGN of a batch from ``torch.func``, an optimizer, and a preconditioner.

    pip install ".[torch]"          # torch==2.13.0; nothing else in the project imports torch

    from driver.optim import TNGD
    opt = TNGD(model, "cross_entropy", dev, lr=0.1, damping=1e-3, t=100.0)
    for inputs, targets in batches:
        loss = opt.step(inputs, targets)     # forward, GGN, device, update: one TNGD iteration

Convention.  The loss is the mean over the batch of per-sample losses l_i(z_i, y_i) of the model's
outputs z_i (d_z values per sample, m = b d_z in all), so its gradient and generalised Gauss-Newton
matrix are

    g = (1/b) sum_i J_i^T dl_i/dz_i,        F = (1/b) sum_i J_i^T H_i J_i,   H_i = d^2 l_i / dz_i^2,

with J_i (d_z, N) the Jacobian of z_i in the N trainable parameters, flattened in ``model.parameters()``
order.  :func:`ggn` returns J = [J_1; ...; J_b] (m, N) and H = blockdiag(H_i) / b (m, m), the 1/b
folded into H, so F = J^T H J is what goes to the device as ``driver.GGN(J, H, damping)``.

The numpy client :class:`driver.tngd.TNGD` is the one implementation of the device step (eq. 19, warm
start, delay, ranging); this module converts tensors to float64 arrays and back, and writes the result
into the parameters.  Layers that mix samples in the forward pass (BatchNorm in training mode) are not
supported: J is computed per sample under ``torch.func.vmap``; put such a model in ``eval()`` mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
    from torch.func import functional_call, jacrev, vmap
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "driver.optim needs PyTorch: install the extra with  pip install 'spu-emulator[torch]'  (torch==2.13.0)"
    ) from error

from . import tngd as _tngd
from .device import Device
from .errors import InvalidInputError
from .ggn import GGN

__all__ = ["GGNFactors", "ggn", "TNGD", "TNGDPreconditioner", "LOSSES"]

LOSSES = ("cross_entropy", "mse")
LossLike = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GGNFactors:
    """One batch's loss, gradient and GGN factors (module docstring), in the model's dtype.

    loss: 0-d, the batch mean; grad: (N,); J: (m, N); H: (m, m), block-diagonal with the 1/b folded in,
    always float64 (from float32 probabilities diag(p) - p p^T is PSD only to float32 rounding);
    outputs: (b, d_z), the model's outputs flattened per sample.  F = J^T H J.
    """

    loss: torch.Tensor
    grad: torch.Tensor
    J: torch.Tensor
    H: torch.Tensor
    outputs: torch.Tensor

    @property
    def n(self) -> int:
        """Number of trainable parameters N."""
        return self.J.shape[1]

    @property
    def m(self) -> int:
        """Curvature rows m = batch x d_z."""
        return self.J.shape[0]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """F v = J^T (H (J v)) for v (N,): O(N m + m^2), F never formed."""
        return self.J.T @ (self.H.to(self.J.dtype) @ (self.J @ v))

    def to_ggn(self, damping: float) -> GGN:
        """``driver.GGN(J, H, damping)`` in float64, ready for ``Device.load_matrix``."""
        return GGN(_numpy(self.J), _numpy(self.H), damping)


def ggn(model: torch.nn.Module, loss: LossLike, inputs: torch.Tensor, targets: torch.Tensor) -> GGNFactors:
    """The batch's loss, gradient g (N,), Jacobian J (m, N) and output Hessian H (m, m); see the module docstring.

    model: any ``nn.Module`` mapping inputs (b, ...) to outputs (b, ...) sample by sample; its trainable
    parameters (``requires_grad``) are the N columns, in ``model.parameters()`` order.  loss:
    ``"cross_entropy"`` (outputs (b, C) logits; targets class indices (b,) or probabilities (b, C);
    H_i = s (diag p_i - p_i p_i^T), s = sum of the target row), ``"mse"`` (torch's mean reduction,
    l_i = |z_i - y_i|^2 / d_z, H_i = 2 I / d_z; targets of the outputs' shape), or a callable
    ``loss(outputs, targets)`` returning the batch mean as torch's functional losses do: it is called on
    one sample at a time (a batch of 1) and H_i is its ``torch.func.hessian`` in z_i.

    J comes from ``torch.func.jacrev`` of the per-sample output under ``vmap`` (reverse mode, d_z
    vector-Jacobian products per sample), never from finite differences; g = J^T r with r the loss's
    gradient in the outputs.  Cost: b d_z backward passes of one sample, vectorised; memory m N values.
    """
    model, inputs, targets = _check_batch(model, inputs, targets)
    kind = _loss_kind(loss)
    names, trainable, rest = _split_parameters(model)
    b = inputs.shape[0]

    def per_sample(params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = functional_call(model, ({**params, **rest},), (x.unsqueeze(0),))
        z = z.reshape(-1)
        return z, z

    jacobian = vmap(jacrev(per_sample, has_aux=True), in_dims=(None, 0), randomness="different")
    try:
        blocks, outputs = jacobian(trainable, inputs)
    except RuntimeError as error:
        raise InvalidInputError(
            f"the model could not be differentiated sample by sample under torch.func ({error}); layers that mix"
            " samples (BatchNorm in training mode) or change state in forward are not supported: call"
            " model.eval() or use per-sample layers (LayerNorm, GroupNorm)"
        ) from error
    d_z = outputs.shape[1]
    J = torch.cat([blocks[name].reshape(b, d_z, -1) for name in names], dim=2).reshape(b * d_z, -1)
    # the loss's terms in float64: a Hessian from float32 probabilities is PSD only to float32 rounding,
    # and the device's GGN form refuses an H that is not PSD
    z64 = outputs.detach().to(torch.float64)
    y64 = targets.to(torch.float64) if targets.is_floating_point() else targets
    per_loss, residual, hessian = _loss_terms(kind, loss, z64, y64)
    loss_value = per_loss.mean().to(outputs.dtype)
    H = torch.block_diag(*(hessian / b))
    grad = J.T @ (residual.reshape(-1) / b).to(J.dtype)
    for what, value in (("loss", loss_value), ("gradient", grad), ("Jacobian J", J), ("output Hessian H", H)):
        if not bool(torch.isfinite(value).all()):
            raise InvalidInputError(
                f"the batch's {what} is not finite (NaN or inf; loss = {float(loss_value):.6g}); the model has"
                " probably diverged: lower the learning rate or raise the damping, and check the inputs"
            )
    return GGNFactors(loss=loss_value.detach(), grad=grad.detach(), J=J.detach(), H=H.detach(), outputs=outputs)


class _Bridge:
    """What the optimizer and the preconditioner share: the model, the loss, the parameters in
    ``model.parameters()`` order and the numpy client that computes the natural gradient."""

    def __init__(self, model: Any, loss: Any, device: Device | None, core_args: dict[str, Any]):
        if not isinstance(model, torch.nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.kind = _loss_kind(loss)
        self.model = model
        self.loss = loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise InvalidInputError(
                "the model has no trainable parameters (every parameter has requires_grad=False); nothing to optimise"
            )
        self.n = sum(p.numel() for p in self.params)
        self.device = device
        self.core = _tngd.TNGD(device, lr=1.0, **core_args)
        if self.core.solver == "device" and self.n > device.info.cells:
            raise InvalidInputError(
                f"the model has N = {self.n} trainable parameters but the device {device.info.name!r} has"
                f" {device.info.cells} cells; use a device with at least N cells (tngd-sim has"
                " 2^20) or a digital solver"
            )

    def factors(self, inputs: Any, targets: Any) -> GGNFactors:
        factors = ggn(self.model, self.loss, inputs, targets)
        if self.core.solver == "device":
            self._check_fits(factors)
        return factors

    def _check_fits(self, factors: GGNFactors) -> None:
        info = self.device.info
        m, d_z = factors.m, factors.outputs.shape[1]
        if info.max_ggn_rows > 0 and m > info.max_ggn_rows:
            raise InvalidInputError(
                f"the batch's GGN has m = batch x d_z = {m} rows but the device {info.name!r} holds at most"
                f" {info.max_ggn_rows} (coupling.max_ggn_rows); use a batch of at most"
                f" {info.max_ggn_rows // d_z} samples, or a device spec with wider arrays"
            )
        if info.max_ggn_rows == 0 and self.n > info.max_dense_size:
            raise InvalidInputError(
                f"the device {info.name!r} has no GGN arrays and holds a dense matrix of at most"
                f" {info.max_dense_size} x {info.max_dense_size}, but the model has N = {self.n} parameters"
            )

    def blocks(self, vector: np.ndarray) -> list[torch.Tensor]:
        """Split an (N,) float64 vector into tensors shaped, typed and placed like the parameters."""
        tensor = torch.from_numpy(np.ascontiguousarray(vector))
        pieces = torch.split(tensor, [p.numel() for p in self.params])
        pairs = zip(pieces, self.params, strict=True)
        return [piece.view_as(p).to(dtype=p.dtype, device=p.device) for piece, p in pairs]

    def natural_gradient(self, factors: GGNFactors) -> np.ndarray:
        g, J, H = _numpy(factors.grad), _numpy(factors.J), _numpy(factors.H)
        return self.core.natural_gradient(g, J=J, H=H)


class TNGD(torch.optim.Optimizer):
    """Thermodynamic natural gradient descent as a ``torch.optim.Optimizer`` (arXiv 2405.13817, Alg. 1).

    TNGD(model, loss, device=None, *, lr, damping, t=None, delay=0.0, base="sgd", momentum=0.0,
         betas=(0.0, 0.0), eps=1e-8, solver="device", readout="state", burn_in=0.0, cg_iters=200,
         warm_start=True, state_scale=None, params=None)

    One iteration is ``loss = opt.step(inputs, targets)``: the model's outputs, :func:`ggn`, the natural
    gradient g~ of (F + lambda I) g~ = g on the device (``solver="device"``, an open
    :class:`driver.Device`, analog time ``t`` in the units of F) or on the host (``"exact" | "cg" |
    "woodbury" | "none"``), then the base rule: ``"sgd"`` theta -= lr v, v = momentum v + g~; ``"adam"``
    with ``betas`` and ``eps`` (betas (0, 0) is the paper's TNGD-Adam).  Returns the batch loss (0-d).
    The arguments are those of :class:`driver.tngd.TNGD`, whose docstring gives t, delay, readout and
    ranging in full; ``loss`` is as in :func:`ggn`.

    Parameter groups: ``params`` (default: the model's trainable parameters, one group) may split the
    trainable parameters into groups with their own ``lr``; every trainable parameter must be in exactly
    one group.  One natural gradient is computed over all of them (one device load); each group then
    steps with its own lr, so learning-rate schedulers work.  The other hyperparameters are shared: they
    are read from the groups at every step and must agree.  Parameters with ``requires_grad=False`` are
    not touched.

    State: ``state_dict()`` holds, per parameter, its block of the estimate g~ (``"estimate"``) and of the
    momentum buffer or Adam moments, as float64; ``load_state_dict`` restores them bit for bit.  On the
    device, the step after a restore first sets the device's state to the saved estimate (one relaxation
    run), on the same device or a fresh one, and carries on from it.

    A step that fails (bad targets, a non-finite loss, a device error) raises before the parameters are
    written and leaves the optimizer state as it was; checks on the batch run before any device call.
    ``records`` lists the :class:`driver.tngd.StepRecord` of every step (device time, hardware time).
    """

    _SHARED = ("damping", "t", "delay", "momentum", "betas", "eps")

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossLike,
        device: Device | None = None,
        *,
        lr: float,
        damping: float,
        t: float | None = None,
        delay: float = 0.0,
        base: str = "sgd",
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.0, 0.0),
        eps: float = 1e-8,
        solver: str = "device",
        readout: str = "state",
        burn_in: float = 0.0,
        cg_iters: int = 200,
        warm_start: bool = True,
        state_scale: float | None = None,
        params: Iterable[Any] | None = None,
    ):
        _tngd._number(lr, "lr", positive=True)
        core_args = dict(
            damping=damping,
            t=t,
            delay=delay,
            base=base,
            momentum=momentum,
            betas=betas,
            eps=eps,
            solver=solver,
            readout=readout,
            burn_in=burn_in,
            cg_iters=cg_iters,
            warm_start=warm_start,
            state_scale=state_scale,
        )
        self._bridge = _Bridge(model, loss, device, core_args)
        core = self._bridge.core
        defaults = dict(lr=float(lr), damping=core.damping, t=core.t, delay=core.delay, momentum=core.momentum)
        defaults.update(betas=core.betas, eps=core.eps)
        groups = list(params) if params is not None else [{"params": self._bridge.params}]
        super().__init__(groups, defaults)
        _check_groups(self.param_groups, self._bridge.params)
        self._publish_state()

    @property
    def core(self) -> _tngd.TNGD:
        """The numpy client that computes the natural gradient (its ``records``, ``state_scale``)."""
        return self._bridge.core

    @property
    def records(self) -> list[_tngd.StepRecord]:
        return self._bridge.core.records

    def step(self, inputs: Any = None, targets: Any = None) -> torch.Tensor:  # type: ignore[override]
        """One TNGD iteration on the batch (inputs, targets); returns the batch loss before the update (0-d)."""
        _check_not_closure(inputs, targets, "TNGD")
        self._sync_hyperparameters()
        bridge = self._bridge
        factors = bridge.factors(inputs, targets)
        g, J, H = _numpy(factors.grad), _numpy(factors.J), _numpy(factors.H)
        # the client's update with lr = 1 from theta = 0 is -update exactly; each group scales it by its lr
        update = -bridge.core.step(np.zeros(bridge.n), g, J=J, H=H)
        blocks = dict(zip(map(id, bridge.params), bridge.blocks(update), strict=True))
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(blocks[id(p)], alpha=-group["lr"])
        self._publish_state()
        return factors.loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        core = self._bridge.core.state_dict()
        state["tngd"] = {name: core[name] for name in ("state_scale", "n", "steps")}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "tngd" not in state_dict:
            raise InvalidInputError(
                "this is not a driver.optim.TNGD state dict (no 'tngd' entry); pass what TNGD.state_dict() returned"
            )
        core = _core_state(state_dict, self._bridge, _OPTIMIZER_STATE)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "tngd"})
        _check_groups(self.param_groups, self._bridge.params)
        self._bridge.core.load_state_dict(core)
        self._publish_state()

    def _sync_hyperparameters(self) -> None:
        """Push the shared hyperparameters from the groups (a scheduler may have changed them) into the client."""
        core = self._bridge.core
        for key in self._SHARED:
            values = [group[key] for group in self.param_groups]
            if any(value != values[0] for value in values[1:]):
                raise InvalidInputError(
                    f"the parameter groups disagree on {key!r} ({values}); TNGD computes one natural gradient for"
                    f" all groups, so only 'lr' may differ between them"
                )
        for group in self.param_groups:
            _tngd._number(group["lr"], "lr", positive=True)
        first = self.param_groups[0]
        core.damping = _tngd._number(first["damping"], "damping", positive=True)
        core.delay = _tngd._number(first["delay"], "delay")
        core.momentum = _tngd._fraction(first["momentum"], "momentum")
        core.betas = (_tngd._fraction(first["betas"][0], "beta1"), _tngd._fraction(first["betas"][1], "beta2"))
        core.eps = _tngd._number(first["eps"], "eps", positive=True)
        if first["t"] is not None or core.solver != "device":
            core.t = None if first["t"] is None else _tngd._number(first["t"], "t")

    def _publish_state(self) -> None:
        """Mirror the client's state into ``self.state[p]`` (float64 blocks), the torch way."""
        _publish(self.state, self._bridge, _OPTIMIZER_STATE)


class TNGDPreconditioner:
    """Replace every trainable parameter's ``.grad`` with its block of the natural gradient g~.

    TNGDPreconditioner(model, loss, device=None, *, damping, t=None, delay=0.0, solver="device",
                       readout="state", burn_in=0.0, cg_iters=200, warm_start=True, state_scale=None)

    In the style of kfac-pytorch: ``loss = precond.step(inputs, targets)`` computes the batch's GGN and
    g~ as :class:`TNGD` does (same arguments and checks, less the update rule), writes g~ into ``.grad``
    and returns the batch loss; any torch optimizer steps next.  ``torch.optim.SGD(lr)`` after it is
    TNGD with base "sgd"; ``torch.optim.Adam(betas=(0, 0))`` after it is the paper's TNGD-Adam.
    ``state_dict()`` / ``load_state_dict()`` hold the estimate g~ (see :class:`TNGD`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossLike,
        device: Device | None = None,
        *,
        damping: float,
        t: float | None = None,
        delay: float = 0.0,
        solver: str = "device",
        readout: str = "state",
        burn_in: float = 0.0,
        cg_iters: int = 200,
        warm_start: bool = True,
        state_scale: float | None = None,
    ):
        core_args = dict(
            damping=damping,
            t=t,
            delay=delay,
            solver=solver,
            readout=readout,
            burn_in=burn_in,
            cg_iters=cg_iters,
            warm_start=warm_start,
            state_scale=state_scale,
        )
        self._bridge = _Bridge(model, loss, device, core_args)
        self.state: dict[torch.Tensor, dict[str, Any]] = {}
        _publish(self.state, self._bridge, _PRECONDITIONER_STATE)

    @property
    def core(self) -> _tngd.TNGD:
        return self._bridge.core

    @property
    def records(self) -> list[_tngd.StepRecord]:
        return self._bridge.core.records

    def step(self, inputs: Any = None, targets: Any = None) -> torch.Tensor:
        """Compute g~ for the batch and write it into ``.grad``; returns the batch loss (0-d)."""
        _check_not_closure(inputs, targets, "TNGDPreconditioner")
        bridge = self._bridge
        factors = bridge.factors(inputs, targets)
        direction = bridge.natural_gradient(factors)
        for p, block in zip(bridge.params, bridge.blocks(direction), strict=True):
            p.grad = block.clone()
        _publish(self.state, bridge, _PRECONDITIONER_STATE)
        return factors.loss

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {"estimate": tensor}}, "tngd": {...}}, indices in ``model.parameters()`` order."""
        core = self._bridge.core.state_dict()
        index = {id(p): i for i, p in enumerate(self._bridge.params)}
        state = {index[id(p)]: {k: v.clone() for k, v in entry.items()} for p, entry in self.state.items()}
        return {"state": state, "tngd": {name: core[name] for name in ("state_scale", "n", "steps")}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "tngd"}:
            raise InvalidInputError(
                "this is not a TNGDPreconditioner state dict; pass what TNGDPreconditioner.state_dict() returned"
            )
        self._bridge.core.load_state_dict(_core_state(state_dict, self._bridge, _PRECONDITIONER_STATE))
        _publish(self.state, self._bridge, _PRECONDITIONER_STATE)


# the client's state arrays and the names their per-parameter blocks carry in torch's state
_OPTIMIZER_STATE = {
    "estimate": "estimate",
    "velocity": "momentum_buffer",
    "moment1": "exp_avg",
    "moment2": "exp_avg_sq",
}
_PRECONDITIONER_STATE = {"estimate": "estimate"}


def _publish(state: dict, bridge: _Bridge, names: dict[str, str]) -> None:
    core = bridge.core.state_dict()
    sizes = [p.numel() for p in bridge.params]
    for p in bridge.params:
        state.pop(p, None)
    for key, name in names.items():
        if core[key] is None:
            continue
        for p, piece in zip(bridge.params, torch.split(torch.from_numpy(core[key]), sizes), strict=True):
            state.setdefault(p, {})[name] = piece.view_as(p).clone()
    if core["steps"]:
        for p in bridge.params:
            state.setdefault(p, {})["step"] = torch.tensor(float(core["steps"]))


def _core_state(state_dict: dict[str, Any], bridge: _Bridge, names: dict[str, str]) -> dict[str, Any]:
    """The client's state from a torch-style state dict whose "state" is keyed by parameter index
    (``model.parameters()`` order over the groups), read before torch casts it to the parameters' dtype."""
    scalars = state_dict["tngd"]
    entries = state_dict.get("state", {})
    order = _saved_order(state_dict, bridge)
    core: dict[str, Any] = {"state_scale": scalars["state_scale"], "n": scalars["n"], "steps": scalars["steps"]}
    for key, name in names.items():
        pieces = [entries.get(index, {}).get(name) for index in order]
        if all(piece is None for piece in pieces):
            core[key] = None
            continue
        if any(piece is None for piece in pieces):
            raise InvalidInputError(f"the state dict has {name!r} for some parameters but not all")
        core[key] = torch.cat([torch.as_tensor(piece).reshape(-1).to(torch.float64) for piece in pieces]).numpy()
    for key in ("estimate", "velocity", "moment1", "moment2"):
        core.setdefault(key, None)
    if core["estimate"] is not None and core["estimate"].shape[0] != bridge.n:
        raise InvalidInputError(
            f"the state dict is for {core['estimate'].shape[0]} parameters but this model has {bridge.n}"
        )
    return core


def _saved_order(state_dict: dict[str, Any], bridge: _Bridge) -> list[int]:
    """Saved indices in ``model.parameters()`` order: torch pairs saved and current parameters group by group."""
    groups = state_dict.get("param_groups")
    if groups is None:
        return list(range(len(bridge.params)))
    saved = [index for group in groups for index in group["params"]]
    if len(saved) != len(bridge.params):
        raise InvalidInputError(
            f"the state dict has {len(saved)} parameters but this optimizer has {len(bridge.params)}"
        )
    return saved


def _check_groups(groups: list[dict[str, Any]], params: list[torch.Tensor]) -> None:
    """Every trainable parameter in exactly one group, and nothing else; puts the groups' parameters in
    ``model.parameters()`` order of the saved state's pairing (torch pairs by position)."""
    seen = [p for group in groups for p in group["params"]]
    trainable = {id(p) for p in params}
    extra = [p for p in seen if id(p) not in trainable]
    if extra or len(seen) != len(params) or {id(p) for p in seen} != trainable:
        raise InvalidInputError(
            f"the parameter groups hold {len(seen)} tensors ({len(extra)} not trainable parameters of the model);"
            f" they must hold each of the model's {len(params)} trainable parameters exactly once, since TNGD computes"
            " one natural gradient over all of them"
        )


def _check_not_closure(inputs: Any, targets: Any, who: str) -> None:
    if callable(inputs) and targets is None:
        raise InvalidInputError(
            f"{who}.step takes the batch, not a closure: call  loss = opt.step(inputs, targets)  with the batch's"
            " input and target tensors; it evaluates the model, its Jacobian and the loss's Hessian itself"
        )
    if inputs is None or targets is None:
        raise InvalidInputError(f"{who}.step needs the batch: loss = opt.step(inputs, targets)")


def _check_batch(model: Any, inputs: Any, targets: Any) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for what, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(
                f"{what} must be a torch.Tensor, got {type(value).__name__}; convert with torch.as_tensor(...)"
            )
        if value.dim() == 0:
            raise InvalidInputError(f"{what} must have a batch dimension first, got a 0-d tensor")
    if inputs.shape[0] == 0:
        raise InvalidInputError("the batch is empty: inputs have 0 samples")
    if targets.shape[0] != inputs.shape[0]:
        raise InvalidInputError(
            f"inputs have {inputs.shape[0]} samples but targets have {targets.shape[0]}; one target per sample"
        )
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise InvalidInputError("inputs contain NaN or inf")
    return model, inputs, targets


def _loss_kind(loss: Any) -> str:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise InvalidInputError(
                f"loss = {loss!r} is not one of {', '.join(map(repr, LOSSES))}; or pass a callable loss(outputs,"
                " targets) returning the batch mean"
            )
        return loss
    if callable(loss):
        return "callable"
    raise InvalidInputError(f"loss must be 'cross_entropy', 'mse' or a callable, got {loss!r}")


def _split_parameters(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trainable parameters by name in ``model.parameters()`` order, and everything else (frozen, buffers)."""
    names, trainable, rest = [], {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            trainable[name] = p.detach()
        else:
            rest[name] = p.detach()
    rest.update({name: buffer for name, buffer in model.named_buffers()})
    if not names:
        raise InvalidInputError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return names, trainable, rest


def _loss_terms(
    kind: str, loss: Any, z: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample losses (b,), their gradients in z (b, d_z) and Hessians (b, d_z, d_z)."""
    b, d_z = z.shape
    if kind == "cross_entropy":
        y = _class_targets(y, b, d_z, z.dtype)
        log_p = torch.log_softmax(z, dim=1)
        p = log_p.exp()
        weight = y.sum(dim=1)
        per_loss = -(y * log_p).sum(dim=1)
        residual = weight[:, None] * p - y
        # diagonal p_c (1 - p_c) with 1 - p_c = sum_{j != c} p_j taken in log space: p_c - p_c^2 cancels to 0
        # for a saturated softmax (p_c = 1 - 1e-31) and leaves an indefinite H; this way each block's rows
        # sum to zero with a non-negative diagonal, PSD to round-off of the block's own size
        others = torch.logsumexp(z[:, None, :] + _off_diagonal(d_z, z), dim=2) - torch.logsumexp(z, dim=1)[:, None]
        hessian = -p[:, :, None] * p[:, None, :]
        hessian.diagonal(dim1=1, dim2=2).copy_(p * others.exp())
        return per_loss, residual, weight[:, None, None] * hessian
    if kind == "mse":
        if not y.is_floating_point() or y.reshape(b, -1).shape != (b, d_z):
            raise InvalidInputError(
                f"loss 'mse' needs floating-point targets of the outputs' shape ({b}, {d_z}), got"
                f" {tuple(y.shape)} {y.dtype}; convert with targets.float() or reshape them"
            )
        diff = z - y.reshape(b, d_z).to(z.dtype)
        eye = torch.eye(d_z, dtype=z.dtype, device=z.device)
        return (diff**2).mean(dim=1), 2.0 * diff / d_z, (2.0 / d_z) * eye.expand(b, d_z, d_z)
    return _callable_terms(loss, z, y)


def _off_diagonal(d: int, like: torch.Tensor) -> torch.Tensor:
    """(d, d): 0 off the diagonal, -inf on it (masks class c out of a logsumexp over classes)."""
    mask = torch.zeros(d, d, dtype=like.dtype, device=like.device)
    return mask.fill_diagonal_(-torch.inf)


def _callable_terms(loss: Callable, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    def one(z_i: torch.Tensor, y_i: torch.Tensor) -> torch.Tensor:
        value = loss(z_i.unsqueeze(0), y_i.unsqueeze(0))
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise InvalidInputError(
                "a callable loss must return the batch mean as a 1-element tensor (like torch's functional losses"
                f" with reduction='mean'), got {type(value).__name__}"
                + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else "")
            )
        return value.reshape(())

    try:
        per_loss = vmap(one)(z, y)
        residual = vmap(torch.func.grad(one))(z, y)
        hessian = vmap(torch.func.hessian(one))(z, y)
    except InvalidInputError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise InvalidInputError(
            f"the callable loss failed on one sample (outputs {tuple(z.shape[1:])}, targets {tuple(y.shape[1:])}):"
            f" {error}"
        ) from error
    return per_loss, residual, hessian


def _class_targets(y: torch.Tensor, b: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Cross-entropy targets as (b, C) weights: class indices one-hot, probabilities as given."""
    if y.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if y.shape != (b,):
            raise InvalidInputError(
                f"loss 'cross_entropy' takes class indices of shape ({b},) or probabilities of shape ({b}, {classes}),"
                f" got integer targets of shape {tuple(y.shape)}"
            )
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise InvalidInputError(
                f"class indices must lie in [0, {classes}) for a model with {classes} outputs, got values in"
                f" [{low}, {high}]"
            )
        return torch.nn.functional.one_hot(y.long(), classes).to(dtype)
    if y.is_floating_point():
        if y.shape != (b, classes):
            raise InvalidInputError(
                f"loss 'cross_entropy' takes probabilities of shape ({b}, {classes}) or class indices of shape ({b},),"
                f" got floating-point targets of shape {tuple(y.shape)}"
            )
        if not bool(torch.isfinite(y).all()) or bool((y < 0).any()):
            raise InvalidInputError("cross-entropy target probabilities must be finite and non-negative")
        return y.to(dtype)
    raise InvalidInputError(
        f"loss 'cross_entropy' takes integer class indices or floating-point probabilities, got {y.dtype}"
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()
