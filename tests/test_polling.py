"""The adaptive polling window of the wire's frame reader (``spu_emulator.wire.AdaptivePolling``).

A quiet link, where every poll catches its frame, keeps the full window; a loaded one, where polls
time out, falls to sleeping at once within a few misses, and probes again now and then.
"""

from __future__ import annotations

import socket
import threading

import pytest

from spu_emulator import wire
from spu_emulator.wire import AdaptivePolling

POLL_S = 1e-3


def test_hits_keep_the_full_window():
    polling = AdaptivePolling()
    for _ in range(100):
        assert polling.window(POLL_S) == POLL_S
        polling.record(True)


def test_misses_halve_the_window_down_to_sleeping_at_once():
    polling = AdaptivePolling()
    windows = []
    for _ in range(6):
        windows.append(polling.window(POLL_S))
        polling.record(False)
    # 1, 1/2, 1/4, 1/8, 1/16 of poll_s, then 0: five misses in a row stop the spinning
    assert windows[:5] == pytest.approx([POLL_S / 2**k for k in range(5)])
    assert windows[5] == 0.0


def test_a_sleeping_reader_probes_every_32nd_read_and_recovers_on_hits():
    polling = AdaptivePolling()
    for _ in range(5):
        polling.window(POLL_S)
        polling.record(False)
    windows = [polling.window(POLL_S) for _ in range(AdaptivePolling.PROBE_EVERY)]
    assert windows[:-1] == [0.0] * (AdaptivePolling.PROBE_EVERY - 1)
    assert windows[-1] == pytest.approx(POLL_S / 16)  # the probe
    polling.record(True)  # it paid: the window grows back, doubling per hit
    grown = []
    for _ in range(5):
        grown.append(polling.window(POLL_S))
        polling.record(True)
    assert grown == pytest.approx([POLL_S / 16, POLL_S / 8, POLL_S / 4, POLL_S / 2, POLL_S])


def test_no_polling_asked_is_no_polling():
    polling = AdaptivePolling()
    assert polling.window(0.0) == 0.0


def test_a_reader_whose_peer_is_late_stops_spinning():
    """Over a real socket pair: frames that come after the window are still read (by sleeping), and the
    reader's window shrinks to zero; frames already waiting are caught by the poll and keep it open."""
    host, device = socket.socketpair()
    try:
        reader = wire.FrameReader(device)
        for request_id in range(1, 6):  # nothing waiting when the read starts: each poll times out
            assert reader.polling.fraction > 0.0
            sender = threading.Timer(0.05, host.sendall, (wire.encode_frame(wire.REQUEST, 8, 0, request_id),))
            sender.start()
            header, _ = reader.read(5.0, 5.0, POLL_S)
            sender.join()
            assert header.request_id == request_id
        assert reader.polling.window(POLL_S) == 0.0  # five misses: the reader now sleeps at once
        host.sendall(wire.encode_frame(wire.REQUEST, 8, 0, 6))
        header, _ = reader.read(5.0, 5.0, POLL_S)  # read (sleeping) all the same
        assert header.request_id == 6
    finally:
        host.close()
        device.close()
