"""Hosts as Linux network namespaces on a bridge, and programs started inside them (shared by multi-host tests).

The namespaces share the machine's file system and processes with the test;
only the network is their own. Everything made here is removed by whoever
made it (``Hosts.destroy``, ``Processes.stop_all``), in a ``finally``.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
import time

from .conftest import read_lines_until


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class Hosts:
    """Namespaces ``zd-<tag>-1..N`` on a bridge in ``zd-<tag>-br``, addresses ``10.a.b.1..N``."""

    def __init__(self, n: int):
        self.tag = secrets.token_hex(3)
        self.subnet = f"10.{random.randrange(1, 255)}.{random.randrange(0, 255)}"
        self.bridge_ns = f"zd-{self.tag}-br"
        self.names = [f"zd-{self.tag}-{i}" for i in range(1, n + 1)]
        self.addresses = [f"{self.subnet}.{i}" for i in range(1, n + 1)]
        self.created: list[str] = []

    def build(self) -> None:
        for ns in [self.bridge_ns, *self.names]:
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.names, self.addresses), start=1):
            # Both ends are created inside our namespaces: the bridge end stays in
            # the bridge namespace, the other moves into the host namespace as eth0.
            _ip("-n", self.bridge_ns, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", f"v{i}", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def destroy(self) -> None:
        for ns in reversed(self.created):
            # Anything still running inside (there should be nothing): kill it by PID.
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)  # takes its veth ends (and the bridge) with it
        self.created = []


def namespace_skip_reason() -> str | None:
    """Why network namespaces cannot be made here (not Linux, no ``ip``, not root, not allowed), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed: apt-get install -y iproute2"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"zd-{secrets.token_hex(3)}-probe"
    try:
        result = _ip("netns", "add", probe, check=False)
        if result.returncode != 0:
            return f"cannot create a network namespace here: {result.stderr.strip()}"
        result = _ip("netns", "exec", probe, "true", check=False)
        if result.returncode != 0:
            return f"cannot run a program in a network namespace here: {result.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Processes:
    """Programs started in namespaces; all killed by PID at the end."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen, str]] = []

    def start(self, ns: str, label: str, args: list[str]) -> subprocess.Popen:
        log_path = os.path.join(self.log_dir, f"{label}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, *args],  # ip execs python: same PID
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        self.started.append((label, process, log_path))
        return process

    def wait_line(self, process: subprocess.Popen, marker: str, timeout: float = 60.0) -> str:
        """The first line ``process`` printed that contains ``marker``."""
        return read_lines_until(process, marker, timeout, describe=self.logs)[-1]

    def log(self, label: str) -> str:
        for name, _, path in self.started:
            if name == label:
                with open(path, errors="replace") as f:
                    return f.read()
        return ""

    def logs(self) -> str:
        return "\n".join(f"--- {label} ---\n{self.log(label)[-3000:]}" for label, _, _ in self.started)

    def stop_all(self) -> None:
        for _, process, _ in self.started:
            if process.poll() is None:
                process.kill()
        for _, process, _ in self.started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass
            if process.stdout is not None:
                process.stdout.close()




class SSHDaemons:
    """OpenSSH servers, one in each namespace of ``hosts``, reached as root by a key made here.

    ``client_key`` and ``known_hosts`` are what a client passes to
    ``asyncssh.connect(..., client_keys=[client_key], known_hosts=known_hosts)``.
    Every sshd is killed by PID in :meth:`stop`; ``/run/sshd`` (sshd's
    privilege-separation directory) is removed again if this made it.
    """

    SSHD = "/usr/sbin/sshd"

    def __init__(self, names: list[str], addresses: list[str], directory: str):
        self.names = names
        self.addresses = addresses
        self.directory = directory
        self.client_key = os.path.join(directory, "client_key")
        self.known_hosts = os.path.join(directory, "known_hosts")
        self.processes: list[subprocess.Popen] = []
        self._made_run_dir = False

    @staticmethod
    def skip_reason() -> str | None:
        """Why an OpenSSH server cannot run here, after trying to install it (Debian's openssh-server, as root)."""
        if os.path.exists(SSHDaemons.SSHD):
            return None
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return "needs OpenSSH's server (sshd): apt-get install -y openssh-server, as root"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        result = subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], capture_output=True, text=True, timeout=600, env=env)
        if result.returncode != 0 or not os.path.exists(SSHDaemons.SSHD):
            return f"apt-get install openssh-server failed: {result.stderr.strip()[-500:]}"
        return None

    def _keygen(self, path: str) -> str:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True, capture_output=True, timeout=30)
        with open(path + ".pub") as f:
            return f.read().strip()

    def start(self, timeout: float = 30.0) -> None:
        host_public = self._keygen(os.path.join(self.directory, "host_key"))
        client_public = self._keygen(self.client_key)
        authorized = os.path.join(self.directory, "authorized_keys")
        with open(authorized, "w") as f:
            f.write(client_public + "\n")
        with open(self.known_hosts, "w") as f:
            f.writelines(f"{address} {host_public}\n" for address in self.addresses)
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)
            self._made_run_dir = True
        options = {
            "HostKey": os.path.join(self.directory, "host_key"), "AuthorizedKeysFile": authorized, "PermitRootLogin": "prohibit-password",
            "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no", "UsePAM": "no", "StrictModes": "no",
            "PidFile": "none", "MaxSessions": "100", "MaxStartups": "100", "LogLevel": "ERROR",
        }
        for ns, address in zip(self.names, self.addresses):
            args = ["ip", "netns", "exec", ns, self.SSHD, "-D", "-e", "-f", "/dev/null", "-o", f"ListenAddress={address}"]
            for name, value in options.items():
                args += ["-o", f"{name}={value}"]
            log = open(os.path.join(self.directory, f"sshd-{ns}.log"), "wb")
            self.processes.append(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
            log.close()
        # Listening once each namespace shows a socket on port 22 (bounded).
        deadline = time.monotonic() + timeout
        for ns, process in zip(self.names, self.processes):
            while "LISTEN" not in subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltn", "sport", "= :22"], capture_output=True, text=True, timeout=30).stdout:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd in {ns} did not start (exit {process.poll()}): {self.log(ns)}")
                time.sleep(0.1)

    def log(self, ns: str) -> str:
        try:
            with open(os.path.join(self.directory, f"sshd-{ns}.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def pids(self, ns: str) -> set[int]:
        """PIDs running in namespace ``ns`` other than its listening sshd."""
        listeners = {p.pid for p in self.processes}
        found = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout.split()
        return {int(pid) for pid in found} - listeners

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.processes = []
        if self._made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)
            self._made_run_dir = False
