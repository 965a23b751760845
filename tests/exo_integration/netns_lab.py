"""A private network for discovery tests: network namespaces joined by a bridge, made and removed by the test.

Layout (N node namespaces, one hub):

    <prefix>-hub:  bridge br0, ports p1..pN          (no address: it only switches frames)
    <prefix>-n1:   lo, eth0 = 198.18.0.11/24  --veth--  p1
    <prefix>-n2:   lo, eth0 = 198.18.0.12/24  --veth--  p2   ...

198.18.0.0/15 is the range reserved for network benchmark tests (RFC 2544); it is only ever configured inside these
namespaces. The root namespace has no interface on the bridge, so exo's broadcasts (to 198.18.0.255 and to
255.255.255.255) reach the other node namespaces and nothing else: no packet of a test can leave the machine or
reach the host's own network stack. Every veth is created directly inside the hub and node namespaces (never in the
root namespace), so names cannot clash with the host's or with a parallel test run. Deleting a namespace deletes its
interfaces; `close()` kills every process the lab started (by process group) and deletes the namespaces.

Processes run inside a namespace with `ip netns exec`. The test talks to them through sockets created inside that
namespace (setns on a short-lived helper thread), so the test process itself never joins the network either.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.18.0"  # /24 inside the namespaces only; exo derives the subnet broadcast from the first 3 octets
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_available() -> tuple[bool, str]:
    """(True, "") if this process can create network namespaces, veth pairs and bridges; else (False, why)."""
    if shutil.which("ip") is None:
        return False, "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "network namespaces need root (CAP_SYS_ADMIN + CAP_NET_ADMIN)"
    probe = f"exrp-{uuid.uuid4().hex[:8]}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return False, f"`ip netns add` failed here: {made.stderr.strip()}"
        veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        for res, what in ((veth, "veth pairs"), (bridge, "bridges")):
            if res.returncode != 0:
                return False, f"cannot create {what} in a network namespace: {res.stderr.strip()}"
        run = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True, text=True, timeout=20)
        if run.returncode != 0:
            return False, f"`ip netns exec` failed here: {run.stderr.strip()}"
        return True, ""
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"network namespaces unavailable: {e}"
    finally:
        _ip("netns", "del", probe, check=False)


def _socket_in_netns(netns: str) -> socket.socket:
    """A TCP socket that belongs to `netns` (setns affects only the calling thread, so a throwaway thread does it)."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=work, name=f"setns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["sock"]  # type: ignore[return-value]


class _NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        sock = _socket_in_netns(self.netns)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass
class HttpReply:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body or b"null")


@dataclass
class Host:
    """One node namespace: its name, its address on the test subnet."""

    label: str
    netns: str
    addr: str


@dataclass
class NetnsLab:
    """Namespaces + bridge; processes started in them; everything undone by close()."""

    n_hosts: int
    prefix: str = field(default_factory=lambda: f"exrd-{uuid.uuid4().hex[:6]}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def create(self) -> "NetnsLab":
        """Make the hub with its bridge and one namespace per host (h1..hN, addresses .11, .12, ...)."""
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i in range(1, self.n_hosts + 1):
                label, netns, addr = f"h{i}", f"{self.prefix}-n{i}", f"{SUBNET}.{10 + i}"
                _ip("netns", "add", netns)
                self.hosts[label] = Host(label, netns, addr)
                _ip("-n", self.hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", netns)
                _ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
                _ip("-n", netns, "addr", "add", f"{addr}/24", "broadcast", f"{SUBNET}.255", "dev", "eth0")
                _ip("-n", netns, "link", "set", "eth0", "up")
                _ip("-n", netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def namespaces(self) -> list[str]:
        return [self.hub, *(h.netns for h in self.hosts.values())]

    def popen(self, label: str, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        """Start `cmd` inside host `label`'s namespace, in its own process group, output to `log`."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[label].netns, *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait: float = 20.0) -> None:
        """Send `sig` to the process group of `proc` and reap it (SIGKILL if it outlives `wait`)."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=wait)

    def request(self, label: str, method: str, url_host: str, port: int, path: str, body: object | None = None,
                timeout: float = 30.0) -> HttpReply:
        """An HTTP request made from inside host `label`'s namespace."""
        conn = _NetnsHTTPConnection(self.hosts[label].netns, url_host, port, timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if body is None else {"Content-Type": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return HttpReply(resp.status, resp.read())
        finally:
            conn.close()

    def close(self) -> None:
        """Kill every process started here (SIGTERM, then SIGKILL), then delete the namespaces."""
        for proc in self.procs:
            self.kill(proc, signal.SIGTERM, wait=10.0)
        self.procs.clear()
        for netns in self.namespaces():
            _ip("netns", "del", netns, check=False)
        leftovers = [n for n in self.namespaces() if (NETNS_DIR / n).exists()]
        self.hosts.clear()
        if leftovers:
            raise RuntimeError(f"network namespaces left behind: {leftovers}")


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value; that value, or AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, http.client.HTTPException) as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r})")
