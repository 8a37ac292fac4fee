"""The warm process's clean-up of a killed launcher's socket directory (run/warm.py)."""

from __future__ import annotations

import os
import socket

import pytest

from ddp_launch.run import warm


@pytest.fixture
def listener(tmp_path):
    """A listening Unix socket in a directory named as multiprocessing names its own."""
    directory = tmp_path / "pymp-test"
    directory.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(directory / "listener-test"))
    sock.listen()
    try:
        yield directory, sock
    finally:
        sock.close()


def test_the_listening_socket_s_directory_is_found(listener):
    directory, _ = listener
    assert warm._listening_socket_directory() == str(directory)


def test_a_socket_that_does_not_listen_is_not_the_server_s(tmp_path):
    directory = tmp_path / "pymp-test"
    directory.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(directory / "listener-test"))  # bound, never listening
        assert warm._listening_socket_directory() is None


def test_a_listener_outside_a_multiprocessing_directory_is_left_alone(tmp_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "listener-test"))
        sock.listen()
        assert warm._listening_socket_directory() is None


def test_removed_only_by_the_server_and_only_once_its_launcher_is_gone(listener):
    directory, _ = listener
    me, parent = os.getpid(), os.getppid()
    warm._remove_when_orphaned(str(directory), me, parent)  # the launcher is still its parent
    assert directory.exists()
    warm._remove_when_orphaned(str(directory), me + 1, parent + 1)  # a worker's inherited handler
    assert directory.exists()
    warm._remove_when_orphaned(str(directory), me, parent + 1)  # reparented: the launcher died
    assert not directory.exists()
