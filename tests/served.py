"""Devices for tests that run over either transport: in this process, or served on loopback TCP.

``open_device(spec, seed, transport)`` opens the same device either way.  A test module that
imports the ``transport`` fixture runs every one of its tests once per transport, and opens its
devices with ``open_under_test(spec, seed)``.  Served devices come
from a small pool of servers, one per (spec, seed), started on first use: ``driver.open`` resets
the device, so a served device starts at power-on like a fresh in-process one, and one server can
be opened again and again.  The pool keeps the most recently used servers and shuts the rest
down; ``conftest.py`` shuts it all down when the session ends.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest

import driver
from spu_emulator import Firmware, load_spec
from spu_emulator.server import DeviceServer

TRANSPORTS = ("in-process", "tcp")
_KEEP = 4  # servers kept running at once


class _Pool:
    def __init__(self) -> None:
        self._servers: OrderedDict[tuple[str, int], DeviceServer] = OrderedDict()

    def url(self, spec: str | Path, seed: int) -> str:
        key = (str(spec), seed)
        server = self._servers.get(key)
        if server is None:
            while len(self._servers) >= _KEEP:
                self._servers.popitem(last=False)[1].shutdown()
            server = DeviceServer(Firmware(load_spec(spec), seed=seed), "127.0.0.1", 0).start()
            self._servers[key] = server
        self._servers.move_to_end(key)
        return server.url

    def close(self) -> None:
        while self._servers:
            self._servers.popitem()[1].shutdown()


POOL = _Pool()


def open_device(spec: str | Path, seed: int, transport: str) -> driver.Device:
    """``driver.open(spec, seed)`` over ``transport``, "in-process" or "tcp"."""
    if transport == "in-process":
        return driver.open(spec, seed=seed)
    if transport != "tcp":
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    return driver.open(POOL.url(spec, seed), seed=seed, timeout=60.0)


_current = "in-process"  # the transport of the module pass under way


@pytest.fixture(scope="module", autouse=True, params=TRANSPORTS)
def transport(request):
    """Imported into a test module: runs each of its tests over each transport (module scope, which
    hypothesis allows, unlike a function-scoped fixture)."""
    global _current
    _current = request.param
    yield request.param
    _current = "in-process"


def current_transport() -> str:
    return _current


def open_under_test(spec: str | Path, seed: int) -> driver.Device:
    """The device under test, over the transport of this module pass."""
    return open_device(spec, seed, _current)
