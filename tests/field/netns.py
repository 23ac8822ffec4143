"""The field suite's network: one namespace per host, a bridge between them, a cloud behind two uplinks.

Layout (every namespace name starts with ``PREFIX``, ``field`` unless ``MESHNODE_FIELD_PREFIX`` says
otherwise; ``TAG`` is ``PREFIX<pid of the harness>``; interfaces, inside the namespaces, are ``fld...``)::

    TAG-hub    bridge fldbr, one port fldpK per node             (no address: a switch)
    TAG-nK     fldm  10.78.0.K/24   -- veth --  fldpK in TAG-hub (the site LAN)
               fldu  10.78.(100+K).2/30 -- veth -- fldcK in TAG-cloud  (uplink nodes only)
               route 10.78.200.1 via 10.78.(100+K).1               (uplink nodes only)
    TAG-cloud  lo 10.78.200.1/32 (the cloud's address), fldcK 10.78.(100+K).1/30

So the cloud is reachable from the uplink nodes' namespaces and from nowhere
else: the other nodes have no route to it, and no namespace forwards. The harness
itself stays in the host's namespace and talks to a node the way its charger
does, from inside the node's namespace (`call_in`): an HTTP request to the
node's own address never crosses the LAN, so loss and partitions touch only
mesh and uplink traffic, as on a site where the charger is wired to its gateway.

Faults, each undone by its counterpart and all by `heal`:

- loss: an nftables table in the hub, ``bridge`` family, forward hook,
  ``numgen random mod 100 < PCT drop``: every frame between two hosts (CoAP,
  mDNS, ARP) is dropped with probability PCT/100, once per hop. The kernel
  has no netem, and nftables needs no module beyond nf_tables.
- isolation: the host's bridge port goes down (its LAN link loses carrier; the
  node sees silence, not errors).
- uplink cut: the cloud side of the host's uplink goes down (the 4G router
  loses its backhaul: the node's connections time out, nothing is refused).

Namespaces of a run whose harness died (its pid no longer exists) are removed
by `remove_leftovers`, which every run calls first; `Network.destroy` removes
a run's own on every exit path.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# Namespace names start with PREFIX (interfaces live inside the namespaces, so their short `fld...`
# names never meet another run's). Set MESHNODE_FIELD_PREFIX to keep concurrent users apart.
PREFIX = os.environ.get("MESHNODE_FIELD_PREFIX", "field")
if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", PREFIX):
    raise ValueError(f"MESHNODE_FIELD_PREFIX {PREFIX!r}: lower-case letters and digits, at most 16")
LAN = "10.78.0"
CLOUD_ADDRESS = "10.78.200.1"
CLONE_NEWNET = 0x40000000
_LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")


class NetworkError(Exception):
    """A command that builds or changes the field network failed; the message has its stderr."""


def missing_requirements() -> str | None:
    """Why this machine cannot run the field suite, or None when it can."""
    if os.geteuid() != 0:
        return (
            "the field suite must run as root (it creates network namespaces, veth pairs, a bridge and "
            "nftables rules); run it with sudo, as CI does"
        )
    for tool in ("ip", "nft", "setpriv"):
        if shutil.which(tool) is None:
            hint = "apt-get install -y nftables" if tool == "nft" else "apt-get install -y iproute2 util-linux"
            return f"the field suite needs `{tool}` ({hint})"
    return None


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def list_namespaces() -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_namespace(name: str) -> None:
    """Kill what still runs in one of our namespaces (processes this suite started), then delete it."""
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", name, check=False)


def remove_leftovers() -> list[str]:
    """Remove the namespaces of field runs whose harness no longer runs (a killed run). Returns their names."""
    removed = []
    for name in list_namespaces():
        m = _LEFTOVER.match(name)
        if m and not _pid_alive(int(m.group(1))):
            remove_namespace(name)
            removed.append(name)
    return removed


# --- running code inside a namespace -----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def enter(namespace: str) -> None:
    """Move the calling thread (only it) into a named network namespace."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"setns into {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(namespace: str, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
    """Run `fn(*args)` in a short-lived thread inside `namespace`; its sockets live there."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            enter(namespace)
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"in-{namespace}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {namespace} took more than {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- the network -------------------------------------------------------------------------


class Network:
    """The namespaces, links and faults of one field run (see the module docstring).

    Args:
        nodes: host names, e.g. ["n1", ..., "n6"]; host i gets 10.78.0.i.
        uplinks: the hosts with an uplink to the cloud namespace.
    """

    def __init__(self, nodes: Iterable[str], uplinks: Iterable[str]) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.nodes = list(nodes)
        self.uplinks = list(uplinks)
        self.index = {name: i + 1 for i, name in enumerate(self.nodes)}
        self.hub = f"{self.tag}-hub"
        self.cloud_ns = f"{self.tag}-cloud"
        self.loss = 0
        self.isolated: set[str] = set()
        self.cut: set[str] = set()
        self.built: list[str] = []

    def ns(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def address(self, node: str) -> str:
        return f"{LAN}.{self.index[node]}"

    def _ip(self, namespace: str, *args: str) -> None:
        sh("ip", "-n", namespace, *args)

    def build(self) -> None:
        for name in [self.hub, self.cloud_ns] + [self.ns(n) for n in self.nodes]:
            sh("ip", "netns", "add", name)
            self.built.append(name)
            self._ip(name, "link", "set", "lo", "up")
        self._ip(self.hub, "link", "add", "fldbr", "type", "bridge")
        self._ip(self.hub, "link", "set", "fldbr", "up")
        self._ip(self.cloud_ns, "addr", "add", f"{CLOUD_ADDRESS}/32", "dev", "lo")
        for node in self.nodes:
            k, ns = self.index[node], self.ns(node)
            self._ip(self.hub, "link", "add", f"fldp{k}", "type", "veth", "peer", "name", "fldm", "netns", ns)
            self._ip(self.hub, "link", "set", f"fldp{k}", "master", "fldbr")
            self._ip(self.hub, "link", "set", f"fldp{k}", "up")
            self._ip(ns, "addr", "add", f"{self.address(node)}/24", "dev", "fldm")
            self._ip(ns, "link", "set", "fldm", "up")
            if node in self.uplinks:
                self._ip(self.cloud_ns, "link", "add", f"fldc{k}", "type", "veth", "peer", "name", "fldu", "netns", ns)
                self._ip(self.cloud_ns, "addr", "add", f"10.78.{100 + k}.1/30", "dev", f"fldc{k}")
                self._ip(self.cloud_ns, "link", "set", f"fldc{k}", "up")
                self._ip(ns, "addr", "add", f"10.78.{100 + k}.2/30", "dev", "fldu")
                self._ip(ns, "link", "set", "fldu", "up")
                self._ip(ns, "route", "add", f"{CLOUD_ADDRESS}/32", "via", f"10.78.{100 + k}.1", "dev", "fldu")

    def destroy(self) -> None:
        for name in reversed(self.built):
            remove_namespace(name)
        self.built.clear()

    # -- faults --

    def set_loss(self, percent: int) -> None:
        """Drop `percent` % of the frames crossing the bridge (0 removes the rule)."""
        if self.loss:
            sh("ip", "netns", "exec", self.hub, "nft", "delete", "table", "bridge", "fldloss")
            self.loss = 0
        if percent:
            rules = (
                "table bridge fldloss {\n  chain drop_some {\n"
                "    type filter hook forward priority 0; policy accept;\n"
                f"    numgen random mod 100 < {int(percent)} drop\n  }}\n}}\n"
            )
            sh("ip", "netns", "exec", self.hub, "nft", "-f", "-", input=rules)
            self.loss = int(percent)

    def isolate(self, node: str) -> None:
        self._ip(self.hub, "link", "set", f"fldp{self.index[node]}", "down")
        self.isolated.add(node)

    def rejoin(self, node: str) -> None:
        self._ip(self.hub, "link", "set", f"fldp{self.index[node]}", "up")
        self.isolated.discard(node)

    def cut_uplink(self, node: str) -> None:
        self._ip(self.cloud_ns, "link", "set", f"fldc{self.index[node]}", "down")
        self.cut.add(node)

    def restore_uplink(self, node: str) -> None:
        self._ip(self.cloud_ns, "link", "set", f"fldc{self.index[node]}", "up")
        self.cut.discard(node)

    def heal(self) -> None:
        self.set_loss(0)
        for node in sorted(self.isolated):
            self.rejoin(node)
        for node in sorted(self.cut):
            self.restore_uplink(node)
