"""One exception hierarchy for everything the driver raises.

    SpuError
    +-- InvalidInputError (also ValueError): bad arrays, shapes, ranges, specs
    |   +-- SpecError: a device spec that cannot be loaded
    +-- DeviceStateError (also RuntimeError): the call is not allowed now
    |   +-- DeviceClosedError: any call after close()
    +-- DeviceBusyError: another host holds the device
    +-- SaturationError (also RuntimeError): the array hit a rail or ran away
    +-- DeviceInternalError (also RuntimeError): the device failed inside a command
    +-- RunAbortedError (also RuntimeError): the run was stopped (ABORT, the server's time limit) and discarded
    +-- ProtocolError: the device answered something the driver cannot read
    +-- LinkError (also ConnectionError): a tcp:// link could not be made or dropped
        +-- LinkTimeoutError (also TimeoutError): no reply within the timeout
        +-- AuthenticationError (also PermissionError): the token was refused, missing or not proved

Every message says what was wrong, the value seen, and what to do.  A call
that raises has changed nothing on the device (a LinkError cannot tell: the
command may have run before the link dropped).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SpuError",
    "InvalidInputError",
    "SpecError",
    "DeviceStateError",
    "DeviceClosedError",
    "DeviceBusyError",
    "SaturationError",
    "DeviceInternalError",
    "ProtocolError",
    "LinkError",
    "LinkTimeoutError",
    "AuthenticationError",
    "RunAbortedError",
]


class SpuError(Exception):
    """Base class of every error the SPU driver raises."""


class InvalidInputError(SpuError, ValueError):
    """An argument is wrong: shape, dtype, NaN/inf, symmetry, range."""


class SpecError(InvalidInputError):
    """A device spec could not be loaded; the message names the file, field and value."""


class DeviceStateError(SpuError, RuntimeError):
    """The call is not allowed in the device's present state (e.g. read before run)."""


class DeviceClosedError(DeviceStateError):
    """The device was closed; open a new one."""


class DeviceBusyError(SpuError):
    """The device is held by another host."""


class SaturationError(SpuError, RuntimeError):
    """The cell array hit a rail or ran away during a run; the run was discarded.

    ``report`` holds the device's account of the discarded run (steps, samples, ...).
    """

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


class DeviceInternalError(SpuError, RuntimeError):
    """The device failed inside a command (status INTERNAL); the command was discarded and its state kept."""


class RunAbortedError(SpuError, RuntimeError):
    """The run was stopped before its end (ABORT from this or another connection of the host, or the
    server's max_run_s) and discarded: the device keeps the state it had before the run."""


class ProtocolError(SpuError):
    """The device's answer could not be understood."""


class LinkError(SpuError, ConnectionError):
    """The link to a tcp:// device could not be made, or it dropped.

    The connection is closed; the next call on the same Device reconnects.
    """


class LinkTimeoutError(LinkError, TimeoutError):
    """The device did not answer within the timeout; the connection was dropped."""


class AuthenticationError(LinkError, PermissionError):
    """The tcp:// device and the host do not share a token: the device refused the host's proof, asked for
    a token the host was not given, or could not prove it holds the host's.  Nothing ran; the link is closed."""
