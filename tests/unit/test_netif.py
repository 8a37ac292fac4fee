"""The interface towards the master, for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME."""

from __future__ import annotations

from ddp_launch.netif import interface_towards, socket_ifname_env


def test_loopback_is_reached_through_lo() -> None:
    assert interface_towards("127.0.0.1") == "lo"


def test_an_unresolvable_host_gives_no_interface_and_no_variable() -> None:
    assert interface_towards("no-such-host.invalid") is None
    assert socket_ifname_env("no-such-host.invalid", {}) == {}


def test_the_users_own_setting_is_kept() -> None:
    assert socket_ifname_env("127.0.0.1", {}) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert socket_ifname_env("127.0.0.1", {"GLOO_SOCKET_IFNAME": "eth9"}) == {"NCCL_SOCKET_IFNAME": "lo"}
    assert socket_ifname_env("127.0.0.1", {"GLOO_SOCKET_IFNAME": "a", "NCCL_SOCKET_IFNAME": "b"}) == {}
