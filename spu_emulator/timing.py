"""Hardware timing model: what each command would take on the device the spec describes (DESIGN 4.6).

The firmware computes it from its own spec and returns it in the reply to every load, run and read
as the map ``hardware_time`` of four floats, in seconds, one per stage (the stages of one command run
one after another, so the command takes their sum):

    link_s          codes over the host link: sum over the arrays sent of codes x bits per code,
                    divided by timing.link_rate_gbps * 1e9.  A code counts at its converter's width
                    (element_bits, dac.bits, adc.bits; 64 for a continuous part, sent as float64),
                    as a hardware link would pack it, not at the 8 bytes of the emulator's wire format.
    program_s       writing element codes into the coupling arrays: rows x timing.program_row_s
                    (a row's elements are written together, rows one after another).
    analog_s        the analog evolution: analog time (tau) x tau, tau = r0_ohm * c0_farad.
    convert_s       ADC conversions outside a run: 1 / adc.sample_rate tau for READ_STATE's snapshot.
                    The conversions of a run happen during it (one ADC per cell) and cost nothing extra.

Per command (n cells; a GGN load has J (m, N), H (m, m)):

    LOAD_MATRIX  link n^2 element codes;                     program n rows
    LOAD_GGN     link m N + m^2 + 1 element codes (J once:   program 2m + N + 1 rows (J: m, H: m,
                 the device writes its codes into both the   J^T: N, the damping diagonal: 1)
                 J and the J^T arrays; H; the damping code)
    LOAD_VECTOR  link n DAC codes                            (the DACs latch together: no rows)
    RUN          analog t x tau
    READ_MEAN    link n sums of K codes, adc.bits + ceil(log2 K) bits each (the on-device accumulator
                 is read exactly; the host divides)
    READ_STATE   link n ADC codes; convert 1 / sample_rate tau
    READ_COV     link n (n + 1) / 2 sums of K code products, 2 adc.bits + ceil(log2 K) bits each, and
                 n sums of K codes (the second-moment accumulator is symmetric; the device divides)
    READ_SAMPLES link k n ADC codes (converted during the run)

For TNGD (16-bit codes, 50 Gb/s, tau = 1 us) one step's load + run + read is then

    16 (m N + m^2 + 1 + N) / 50e9 + (2m + N + 1) program_row_s + t tau + N (16 + ceil(log2 K)) / 50e9

seconds: linear in N for a fixed m, which is the paper's Fig. 2 "TNGD (estimated)".  The model sits on
the device side because it describes the device: a real board knows its link, arrays and converters
and would report (or measure) these times itself, both transports carry them unchanged, and the
driver needs nothing of the emulator's internals to show them.
"""

from __future__ import annotations

import math

from .spec import DeviceSpec

__all__ = [
    "FIELDS",
    "code_bits",
    "load_matrix_time",
    "load_ggn_time",
    "load_vector_time",
    "run_time",
    "read_mean_time",
    "read_state_time",
    "read_cov_time",
    "read_samples_time",
]

FIELDS = ("link_s", "program_s", "analog_s", "convert_s")

# a continuous (bits = 0) part sends its value as a float64
_CONTINUOUS_BITS = 64


def code_bits(bits: int) -> int:
    """Bits one code takes on the link: the converter's width, or 64 for a continuous part."""
    return bits if bits > 0 else _CONTINUOUS_BITS


def _times(spec: DeviceSpec, link_bits: float = 0.0, rows: int = 0, analog_tau: float = 0.0, convert_tau: float = 0.0):
    tau = spec.timing.tau_s
    return {
        "link_s": link_bits / (spec.timing.link_rate_gbps * 1e9),
        "program_s": rows * spec.timing.program_row_s,
        "analog_s": analog_tau * tau,
        "convert_s": convert_tau * tau,
    }


def load_matrix_time(spec: DeviceSpec, n: int) -> dict[str, float]:
    """LOAD_MATRIX of an (n, n) matrix: n^2 element codes over the link, n rows programmed."""
    return _times(spec, link_bits=n * n * code_bits(spec.coupling.element_bits), rows=n)


def load_ggn_time(spec: DeviceSpec, m: int, n: int) -> dict[str, float]:
    """LOAD_GGN with J (m, n): m n + m^2 + 1 element codes over the link, 2m + n + 1 rows programmed."""
    codes = m * n + m * m + 1
    return _times(spec, link_bits=codes * code_bits(spec.coupling.element_bits), rows=2 * m + n + 1)


def load_vector_time(spec: DeviceSpec, n: int) -> dict[str, float]:
    """LOAD_VECTOR of n DAC codes: the link only (the DACs latch all channels at once)."""
    return _times(spec, link_bits=n * code_bits(spec.dac.bits))


def run_time(spec: DeviceSpec, analog_time: float) -> dict[str, float]:
    """RUN for analog_time tau: analog_time x tau (its ADC conversions happen during it)."""
    return _times(spec, analog_tau=analog_time)


def read_mean_time(spec: DeviceSpec, n: int, samples: int) -> dict[str, float]:
    """READ_MEAN of n cells after K = samples conversions: n sums of adc.bits + ceil(log2 K) bits."""
    bits = spec.adc.bits
    per_value = bits + math.ceil(math.log2(samples)) if bits > 0 and samples > 1 else code_bits(bits)
    return _times(spec, link_bits=n * per_value)


def read_state_time(spec: DeviceSpec, n: int) -> dict[str, float]:
    """READ_STATE of n cells: one conversion (1 / sample_rate tau) and n ADC codes over the link."""
    return _times(spec, link_bits=n * code_bits(spec.adc.bits), convert_tau=1.0 / spec.adc.sample_rate)


def _sum_bits(bits: int, terms: int, samples: int) -> int:
    """Bits of an exact on-device sum of K = samples values of ``terms`` x adc.bits bits each."""
    if bits <= 0:
        return code_bits(bits)
    return terms * bits + (math.ceil(math.log2(samples)) if samples > 1 else 0)


def read_cov_time(spec: DeviceSpec, n: int, samples: int) -> dict[str, float]:
    """READ_COV of n cells after K conversions: n (n + 1) / 2 sums of code products and n sums of codes."""
    bits = spec.adc.bits
    link = n * (n + 1) // 2 * _sum_bits(bits, 2, samples) + n * _sum_bits(bits, 1, samples)
    return _times(spec, link_bits=link)


def read_samples_time(spec: DeviceSpec, n: int, k: int) -> dict[str, float]:
    """READ_SAMPLES of k snapshots of n cells: k n ADC codes over the link."""
    return _times(spec, link_bits=k * n * code_bits(spec.adc.bits))
