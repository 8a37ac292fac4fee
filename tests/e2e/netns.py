"""Real hosts on one machine: network namespaces, each with its own address, hostname and link,
joined by a bridge in a switch namespace. Needs root; `available()` says why not otherwise.

    with Hosts(["h0", "h1"]) as hosts:
        p = hosts.popen("h0", [sys.executable, "-m", "ddp_launch", ...])
        hosts.cut("h0")              # the link goes down at the switch: packets vanish, no RST
        hosts.kill_all("h0")         # as a power loss would
    # every process in the namespaces is killed, the namespaces and /etc/netns files removed

Addresses come from 10.213.7.0/24 and exist only inside these namespaces. Each namespace's
/etc/hosts (`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts) names
every host, and `unshare --uts` gives each process its host's name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

SUBNET = "10.213.7"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs ip (iproute2) and unshare"
    name = f"ddlprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Hosts:
    """Hosts `names` (short, e.g. h0), each a namespace at SUBNET.<index + 1>."""

    def __init__(self, names: Sequence[str], own_name_at: Mapping[str, str] | None = None) -> None:
        """`own_name_at`: hosts whose /etc/hosts maps their own name elsewhere: 127.0.1.1, as
        Debian's installer writes it, or an address of a second interface of theirs (made
        here) that no other host can reach."""
        tag = f"dl{os.getpid() % 10000}"
        self.own_name_at = dict(own_name_at or {})
        self.names = list(names)
        self.ns = {h: f"{tag}{h}" for h in self.names}
        self.switch = f"{tag}sw"
        self.address = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.names)}
        self._port = {h: f"{tag}s{i}" for i, h in enumerate(self.names)}  # the switch side of a veth
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, h in enumerate(self.names):
            names = {**self.address, **({h: self.own_name_at[h]} if h in self.own_name_at else {})}
            hosts_file = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in names.items())
            ns, port, inner = self.ns[h], self._port[h], f"{self.ns[h][:10]}v{i}"
            _ip("netns", "add", ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
            _ip("link", "add", inner, "type", "veth", "peer", "name", port)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.address[h]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            elsewhere = self.own_name_at.get(h, "")
            if elsewhere and not elsewhere.startswith("127."):
                # an address of the host's own that no other host can reach (a second NIC)
                # (a veth pair with both ends inside: the dummy driver may not be loaded)
                _ip("-n", ns, "link", "add", "nic1", "type", "veth", "peer", "name", "nic1peer")
                _ip("-n", ns, "addr", "add", f"{elsewhere}/32", "dev", "nic1")
                _ip("-n", ns, "link", "set", "nic1peer", "up")
                _ip("-n", ns, "link", "set", "nic1", "up")

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run in `host`'s namespace with `host` as its hostname."""
        return ["ip", "netns", "exec", self.ns[host], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host, *argv]  # fmt: skip

    def popen(self, host: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.command(host, argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def cut(self, host: str) -> None:
        """Take `host`'s link down at the switch: its packets vanish, nobody gets a reset."""
        _ip("-n", self.switch, "link", "set", self._port[host], "down")

    def mend(self, host: str) -> None:
        """Bring `host`'s link back up after `cut`."""
        _ip("-n", self.switch, "link", "set", self._port[host], "up")

    def pids(self, host: str) -> list[int]:
        out = _ip("netns", "pids", self.ns[host], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, host: str, deadline_s: float = 10.0) -> None:
        """SIGKILL every process in `host`'s namespace, until none is left (a power loss)."""
        end = time.monotonic() + deadline_s
        while (pids := self.pids(host)) and time.monotonic() < end:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def close(self) -> None:
        for h in self.names:
            if self.ns[h] in _ip("netns", "list", check=False).stdout:
                self.kill_all(h)
                _ip("netns", "del", self.ns[h], check=False)
            shutil.rmtree(Path("/etc/netns") / self.ns[h], ignore_errors=True)
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _ip("netns", "del", self.switch, check=False)
