"""Which network interface reaches a host: what gloo and NCCL must bind across hosts.

Left alone, gloo binds the address its own hostname resolves to, which on many machines is
127.0.1.1 or an interface the other nodes cannot reach, and the run hangs in its first
collective. The launcher knows better: the interface its own traffic to the master leaves
by. No packet is sent to find it (a UDP socket's connect only asks the routing table).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

import psutil

GLOO_SOCKET_IFNAME = "GLOO_SOCKET_IFNAME"
NCCL_SOCKET_IFNAME = "NCCL_SOCKET_IFNAME"


def interface_towards(host: str, port: int = 9) -> str | None:
    """The name of the interface whose address this machine uses to reach `host`, or None
    when `host` does not resolve or no interface holds that address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(address)
                local = ipaddress.ip_address(s.getsockname()[0])
        except OSError:
            continue
        for name, addresses in psutil.net_if_addrs().items():
            for a in addresses:
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == local:
                        return name
                except ValueError:
                    continue  # a MAC address
    return None


def socket_ifname_env(master_host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME for a multi-node run's workers: the interface
    towards the master, for each one the user did not set."""
    missing = [name for name in (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) if name not in environ]
    if not missing:
        return {}
    ifname = interface_towards(master_host)
    return {} if ifname is None else dict.fromkeys(missing, ifname)
