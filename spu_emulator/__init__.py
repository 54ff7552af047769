"""The device side of the SPU emulator: spec loading, circuit model, kernels, firmware.

Hosts talk to a device only through :class:`Firmware.handle`; see the ``driver``
package for the user-facing API.
"""

from .firmware import Firmware
from .spec import DeviceSpec, SpecError, load_spec, preset_names

__all__ = ["Firmware", "DeviceSpec", "SpecError", "load_spec", "preset_names"]
