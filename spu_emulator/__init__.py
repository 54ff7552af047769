"""The device side of the SPU emulator: spec loading, circuit model, kernels, firmware.

Hosts talk to a device only through :class:`Firmware.handle`; see the ``driver``
package for the user-facing API.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version

from .firmware import Firmware
from .spec import DeviceSpec, SpecError, load_spec, preset_names

try:  # from the installed distribution's metadata
    __version__: str = _installed_version("spu-emulator")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

__all__ = ["Firmware", "DeviceSpec", "SpecError", "load_spec", "preset_names"]
