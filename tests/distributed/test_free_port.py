"""tests/fairseq_helpers.free_port: a port every distributed test's rank 0 can bind, drawn below the ephemeral range
(where outgoing connections take their source ports), so that concurrent tests do not take it first."""

import socket

from fairseq_helpers import _ephemeral_low, free_port


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    high = _ephemeral_low()
    ports = [free_port() for _ in range(20)]
    assert all(1024 <= p < high for p in ports) and len(set(ports)) > 1
    for port in ports[:3]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: nothing raised


def test_a_taken_port_is_never_handed_out(monkeypatch):
    import fairseq_helpers

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        draws = iter([port, port, *range(20000, 20100)])  # the taken one twice, then others

        class Draws:
            def randrange(self, low, high):
                return next(draws)

        monkeypatch.setattr(fairseq_helpers.random, "SystemRandom", lambda: Draws())
        monkeypatch.setattr(fairseq_helpers, "_ephemeral_low", lambda: 65536)
        got = free_port()
    assert got != port
