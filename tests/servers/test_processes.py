"""Port checks of the stand-in servers' process helpers."""

from __future__ import annotations

import socket

import pytest

from dspy_anyscale.servers import _processes
from dspy_anyscale.servers.llama_server import LocalServerError


def _listener() -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((_processes.HOST, 0))
    server.listen()
    return server


def test_a_listening_port_is_not_free():
    with _listener() as server:
        assert not _processes.port_free(server.getsockname()[1])


def test_a_port_whose_server_closed_its_connections_first_is_free_again():
    # A killed server leaves its side of every open connection in TIME_WAIT: a restart on the same port
    # (which binds with SO_REUSEADDR, as servers do) must not be refused as "already in use".
    server = _listener()
    port = server.getsockname()[1]
    client = socket.create_connection((_processes.HOST, port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    server.close()
    client.recv(1)
    client.close()
    # The state the old check tripped on: a plain bind is refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain, pytest.raises(OSError):
        plain.bind((_processes.HOST, port))
    assert _processes.port_free(port)


def test_start_on_a_taken_port_says_so_before_launching():
    launched = []
    with _listener() as server:
        port = server.getsockname()[1]
        with pytest.raises(LocalServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            _processes.start_on_port(port, launched.append, error=LocalServerError, bind_error=OSError)
    assert launched == []
