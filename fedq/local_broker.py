"""A real RabbitMQ broker for tests and the demo: from the environment, a container, a throwaway
local node, or a fresh vhost on the system broker, in that order of preference."""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from shared import transport
from shared.settings import broker_urls, check_broker_urls, redact_url
from shared.transport import ManagementError, management_call

# The development credentials from broker_config/definitions.json (stored there only as a hash).
DEV_USER = "fedq"
DEV_PASSWORD = "fedq"
DEV_VHOST = "fedq"

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "broker_config"
CONTAINER_IMAGE = "rabbitmq:3.13-management"
# How long the finder waits for the engine and the registry to say whether an image can be had.
ENGINE_TIMEOUT_S = 10
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_SERVER = RABBITMQ_BIN / "rabbitmq-server"
RABBITMQCTL = RABBITMQ_BIN / "rabbitmqctl"
# Debian's wrapper switches to the rabbitmq user and the system node's cookie.
SYSTEM_RABBITMQCTL = Path("/usr/sbin/rabbitmqctl")
SYSTEM_HOST, SYSTEM_PORT = "127.0.0.1", 5672
SYSTEM_MANAGEMENT_URL = "http://127.0.0.1:15672"

_VHOST_SCOPED = ("exchanges", "queues", "bindings", "policies")


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel draws client ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _free_port() -> int:
    """A free port below the kernel's client ports. A node keeps its ports across a restart; one
    drawn from the client range was, with tests in parallel, taken by another connection while the
    node was down, and the node did not come back (its Prometheus listener failed)."""
    low, _ = _ephemeral_ports()
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10_000, low) if low > 10_000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"found no free port on 127.0.0.1 between 10000 and {low} in 100 tries")


def _rewrite_conf(text: str, overrides: dict[str, str | None]) -> str:
    """Replace the values of the given keys in a rabbitmq.conf text (None: remove the key); append keys it lacks."""
    pending = dict(overrides)
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in pending:
            value = pending.pop(key)
            if value is None:
                continue
            line = f"{key} = {value}"
        lines.append(line)
    pending = {k: v for k, v in pending.items() if v is not None}
    if pending:
        lines += ["", "# Added for this throwaway broker."] + [f"{k} = {v}" for k, v in pending.items()]
    return "\n".join(lines) + "\n"


def _enabled_plugins(config_dir: Path) -> set[str]:
    return set(re.findall(r"[a-z0-9_]+", (config_dir / "enabled_plugins").read_text()))


def vhost_definitions(config_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The exchanges, queues, bindings and policies of vhost `fedq` in definitions.json, without "vhost" keys."""
    defs = json.loads((config_dir / "definitions.json").read_text())
    return {
        kind: [
            {k: v for k, v in item.items() if k != "vhost"}
            for item in defs.get(kind, [])
            if item.get("vhost") == DEV_VHOST
        ]
        for kind in _VHOST_SCOPED
    }


def load_vhost_definitions(management_url: str, user: str, password: str, vhost: str,
                           config_dir: Path = DEFAULT_CONFIG_DIR) -> None:
    """Create ``vhost`` if it is missing and load into it the vhost-scoped definitions of
    definitions.json (exchanges, queues, bindings, policies), through the management API."""
    v = urllib.parse.quote(vhost, safe="")
    management_call(management_url, user, password, "PUT", f"/api/vhosts/{v}")
    management_call(management_url, user, password, "POST", f"/api/definitions/{v}", vhost_definitions(config_dir))


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or reaped between open and read
        return False
    # A killed node is reparented to an init that may reap it late; a zombie is gone for our purposes.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _beam_pid(folder: Path) -> int | None:
    """Pid of the running Erlang VM of the node kept in `folder` (named like its node), or None."""
    try:
        pid = int((folder / "data" / f"{folder.name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    # A stale pid file may name a reused pid: only a VM whose home is this folder is ours.
    return pid if str(folder).encode() + b"\0" in cmdline else None


def _boot_errors(path: Path, limit: int = 15) -> str:
    """The lines of a node's output or log that say why it failed to boot."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"  (no {path.name})"
    # The cause comes first; the crash reports after it are noise. Erlang's one-line verdict comes last.
    picked = [line for line in lines if "[error]" in line][:limit]
    picked += [line for line in lines if line.startswith("init terminating in do_boot")][-1:]
    return "\n".join(picked or lines[-limit:])


PORT_DRAWS = 3  # first boots tried, each on freshly drawn ports, before a port clash is an error
# How long a node (local or in a container) may take to boot. In CI, beside two other test
# processes, a compose stack and a three-node cluster, one node's log said "Server startup
# complete" as a 60 s wait ran out, and every test of that process that needed it failed.
BOOT_SECONDS = 180.0
# One `rabbitmqctl await_startup` is given at most this long, then asked again: a call that hangs (the
# CI failure above could not tell a hang from a slow boot) costs this much, not the whole wait.
AWAIT_CALL_SECONDS = 30.0


class _PortTaken(RuntimeError):
    """A node's boot failed because one of its ports was taken (``eaddrinuse``)."""


class LocalNode:
    """A throwaway RabbitMQ node run from the installed binaries, in its own folder and on its own ports."""

    def __init__(
        self,
        config_dir: Path,
        *,
        amqp_port: int | None = None,
        management_port: int | None = None,
        name: str | None = None,
        base_dir: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        cluster: tuple[list[str], str] | None = None,
    ) -> None:
        """``tls`` = (CA certificate, server certificate, server key) also opens broker_config/tls.conf's listener.
        ``cluster`` = (the cluster's node names, its Erlang cookie) loads broker_config/cluster.conf with those
        nodes: the node joins the first of them that runs when it first boots."""
        self.config_dir = Path(config_dir)
        self.tls = tls
        self.cluster = cluster
        self.plugins = _enabled_plugins(self.config_dir)
        self._chosen_ports = (amqp_port, management_port)
        self._draw_ports()
        self._booted = False
        self.name = name or node_name()
        self.folder = Path(base_dir or default_base_dir()) / self.name
        self.pid_file = self.folder / "data" / f"{self.name}.pid"
        self.log_file = self.folder / "log" / f"{self.node}.log"
        self._as_root = os.geteuid() == 0
        self._server: subprocess.Popen[bytes] | None = None

    def _draw_ports(self) -> None:
        amqp_port, management_port = self._chosen_ports
        self.tls_port = _free_port() if self.tls else None
        self.amqp_port = amqp_port or _free_port()
        self.management_port = management_port or _free_port()
        # Prometheus and Erlang distribution also listen; fixed defaults would clash with other nodes.
        self.prometheus_port = _free_port()
        self.dist_port = _free_port()

    @staticmethod
    def available() -> bool:
        """Whether the RabbitMQ binaries (and, as root, the rabbitmq user) are installed."""
        if not (os.access(RABBITMQ_SERVER, os.X_OK) and os.access(RABBITMQCTL, os.X_OK)):
            return False
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("rabbitmq")
            except KeyError:
                return False
        return True

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def has_management(self) -> bool:
        return "rabbitmq_management" in self.plugins

    def _env(self) -> dict[str, str]:
        # Inherited RABBITMQ_*/ERL_* settings, and the system's env, conf.d and advanced.config files,
        # would leak the system node's settings into this one.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        conf = self.folder / "conf"
        env.update(
            HOME=str(self.folder),
            LC_ALL="C.UTF-8",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_CONF_ENV_FILE=str(conf / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(conf / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(conf / "conf.d" / "*.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(conf / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(conf / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.folder / "data"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_LOG_BASE=str(self.folder / "log"),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _process_kwargs(self) -> dict[str, Any]:
        # The node refuses to run as root; as root, run it and its CLI as the rabbitmq user.
        user = {"user": "rabbitmq", "group": "rabbitmq", "extra_groups": []} if self._as_root else {}
        return {"env": self._env(), "cwd": self.folder, "stdin": subprocess.DEVNULL, **user}

    def _write_config(self) -> None:
        conf = self.folder / "conf"
        for sub in ("data", "log", "conf/conf.d"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        overrides: dict[str, str | None] = {
            "listeners.tcp.default": f"127.0.0.1:{self.amqp_port}",
            # A cluster's nodes boot without them and LocalCluster imports them once all run (docs/cluster.md).
            "load_definitions": None if self.cluster else str(conf / "definitions.json"),
        }
        if self.has_management:
            overrides |= {"management.tcp.port": str(self.management_port), "management.tcp.ip": "127.0.0.1"}
        if "rabbitmq_prometheus" in self.plugins:
            overrides |= {"prometheus.tcp.port": str(self.prometheus_port), "prometheus.tcp.ip": "127.0.0.1"}
        source = (self.config_dir / "rabbitmq.conf").read_text()
        (conf / "rabbitmq.conf").write_text(_rewrite_conf(source, overrides))
        if self.tls:
            copies = []
            for path, name in zip(self.tls, ("ca.pem", "server.pem", "server.key")):
                shutil.copyfile(path, conf / name)
                copies.append(str(conf / name))
            tls_overrides = {"listeners.ssl.default": f"127.0.0.1:{self.tls_port}", "ssl_options.cacertfile": copies[0],
                             "ssl_options.certfile": copies[1], "ssl_options.keyfile": copies[2]}
            tls_source = (self.config_dir / "tls.conf").read_text()
            (conf / "conf.d" / "10-tls.conf").write_text(_rewrite_conf(tls_source, tls_overrides))
        if self.cluster:
            nodes, cookie = self.cluster
            peers = {f"cluster_formation.classic_config.nodes.{i}": node for i, node in enumerate(nodes, 1)}
            cluster_source = (self.config_dir / "cluster.conf").read_text()
            (conf / "conf.d" / "20-cluster.conf").write_text(_rewrite_conf(cluster_source, peers))
            # Nodes (and their rabbitmqctl) find the cookie in $HOME, which is this folder.
            cookie_file = self.folder / ".erlang.cookie"
            cookie_file.unlink(missing_ok=True)
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)
        for name in ("definitions.json", "enabled_plugins"):
            shutil.copyfile(self.config_dir / name, conf / name)
        if self._as_root:
            for path in [self.folder, *self.folder.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")

    def beam_pid(self) -> int | None:
        """OS pid of this node's Erlang VM, or None when it is not running."""
        return _beam_pid(self.folder)

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run rabbitmqctl against this node; return its stdout, raise with its output on failure."""
        result = subprocess.run(
            [str(RABBITMQCTL), "-n", self.node, *args], capture_output=True, text=True, timeout=timeout,
            **self._process_kwargs(),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} on node {self.node} failed (exit {result.returncode}):\n"
                f"{result.stderr.strip()}\n{result.stdout.strip()}"
            )
        return result.stdout

    def start(self, timeout: float = BOOT_SECONDS) -> None:
        """Start the node (on its existing data, if any) and wait until it serves clients."""
        if self.beam_pid() is not None:
            return
        _LIVE_NODES.add(self)
        for attempt in range(1, PORT_DRAWS + 1):
            try:
                self._boot(timeout)
                self._booted = True
                return
            except _PortTaken:
                # A port _free_port drew was free when drawn, and another process (a parallel test's
                # node or connection) bound it before this node did. Clients learn a node's ports from
                # it after its first boot, so only then may they change.
                if self._booted or attempt == PORT_DRAWS:
                    raise
                self._draw_ports()

    def _boot(self, timeout: float) -> None:
        self._write_config()
        # Left by a killed VM; a stale one would name a pid that is not this node.
        self.pid_file.unlink(missing_ok=True)
        startup_out = self.folder / "log" / "startup.out"
        # In the foreground (not -detached) a boot failure is printed to our file and the process exits,
        # so it is seen at once; its own session keeps a Ctrl-C of the test run away from it.
        with open(startup_out, "w") as out:
            self._server = subprocess.Popen(
                [str(RABBITMQ_SERVER)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                **self._process_kwargs(),
            )
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            try:
                left = deadline - time.monotonic()
                self.rabbitmqctl("await_startup", timeout=max(1.0, min(AWAIT_CALL_SECONDS, left)))
                return
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                last_error = str(exc)
            if self._server.poll() is not None:
                what = f"exited while starting (exit {self._server.returncode})"
                failure = self._startup_failure(what, last_error)
                raise _PortTaken(failure) if self._port_was_taken() else RuntimeError(failure)
            # The first calls fail until the node has registered with epmd.
            time.sleep(0.5)
        raise RuntimeError(self._startup_failure(f"did not start within {timeout:.0f} s", last_error))

    def _port_was_taken(self) -> bool:
        for path in (self.folder / "log" / "startup.out", self.log_file):
            try:
                if "eaddrinuse" in path.read_text(errors="replace"):
                    return True
            except FileNotFoundError:
                pass
        return False

    def _startup_failure(self, what: str, last_error: str) -> str:
        startup_out = self.folder / "log" / "startup.out"
        return (
            f"RabbitMQ node {self.node} {what}.\n"
            f"Its output ({startup_out}) says:\n{_boot_errors(startup_out)}\n"
            f"Its log ({self.log_file}) says:\n{_boot_errors(self.log_file)}\n"
            f"Last rabbitmqctl error: {last_error.splitlines()[0] if last_error else '-'}\n"
            f"Check {self.config_dir}/rabbitmq.conf and that ports {self.amqp_port} (AMQP), "
            f"{self.management_port} (management), {self.prometheus_port} (prometheus) and "
            f"{self.dist_port} (distribution) are free."
        )

    def stop(self) -> None:
        """Stop the node gracefully, keeping its data."""
        pid = self.beam_pid()
        if pid is None:
            return
        self.rabbitmqctl("stop", str(self.pid_file))
        if not _wait_gone(pid, 30.0):
            raise RuntimeError(f"RabbitMQ node {self.node} (pid {pid}) still runs 30 s after rabbitmqctl stop")
        self._reap_server()

    def restart(self) -> None:
        """Stop and start again on the same data and ports."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the node's VM, as a crash would; start() recovers from its data."""
        pid = self.beam_pid()
        if pid is None:
            raise RuntimeError(f"RabbitMQ node {self.node} is not running: nothing to kill")
        os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10.0):
            raise RuntimeError(f"RabbitMQ node {self.node} (pid {pid}) survived SIGKILL for 10 s")
        self._reap_server()

    def _reap_server(self) -> None:
        # The rabbitmq-server script exits with its VM; wait for it so it does not linger as a zombie.
        if self._server is not None:
            self._server.wait(timeout=10)
            self._server = None

    @property
    def left_behind(self) -> str:
        """What stays if closing fails, and where."""
        return f"RabbitMQ node {self.node} in {self.folder}"

    def close(self) -> None:
        """Stop the node and remove its folder."""
        # The data is thrown away, so a graceful stop (~9 s: RabbitMQ 3.10 idles 5 s in it) buys nothing.
        if self.beam_pid() is not None:
            self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
        _LIVE_NODES.discard(self)


class LocalCluster:
    """Throwaway LocalNodes (three by default) in one RabbitMQ cluster: one Erlang cookie, and
    broker_config/cluster.conf naming them, as a user's real nodes would load it."""

    def __init__(self, config_dir: Path, *, size: int = 3, base_dir: Path | None = None) -> None:
        names = [node_name() for _ in range(size)]
        membership = ([f"{name}@localhost" for name in names], secrets.token_hex(20))
        self.nodes = [LocalNode(config_dir, name=name, base_dir=base_dir, cluster=membership) for name in names]

    def start(self, timeout: float = 120.0) -> None:
        """Start every node, wait until all of them run as one cluster, then load the definitions."""
        # The first forms the cluster alone; the others, started once it runs, join it on their first boot.
        self.nodes[0].start()
        self._in_parallel([node.start for node in self.nodes[1:]])
        deadline = time.monotonic() + timeout
        while (running := self.running_nodes()) != {node.node for node in self.nodes}:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the local RabbitMQ cluster did not form within {timeout:.0f} s: {sorted(running)} run together "
                    f"of {[node.node for node in self.nodes]}. Each node's log (under {self.nodes[0].folder.parent}) "
                    "says why; check broker_config/cluster.conf"
                )
            time.sleep(0.5)
        self.import_definitions()

    def import_definitions(self) -> None:
        """Load broker_config/definitions.json into the cluster, once all its nodes run.

        Not at boot: RabbitMQ 3.10 starts a stream's coordinator on the nodes that run when the first
        stream is declared, and a node that joins later starts a second one of its own. Clients of
        the stream were then closed with 541 INTERNAL_ERROR on every connect, and no run got past
        its first versions. Declared once all three run, every queue has a replica on each.
        """
        first = self.nodes[0]
        first.rabbitmqctl("import_definitions", str(first.folder / "conf" / "definitions.json"))

    @staticmethod
    def _in_parallel(steps: list[Callable[[], None]]) -> None:
        errors: list[BaseException] = []

        def run(step: Callable[[], None]) -> None:
            try:
                step()
            except BaseException as exc:  # raised below, on the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(step,)) for step in steps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def running(self) -> LocalNode:
        """A node that runs, to ask about the cluster."""
        for node in self.nodes:
            if node.beam_pid() is not None:
                return node
        raise RuntimeError("no node of the local RabbitMQ cluster runs; restart() one")

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """rabbitmqctl against a running node (cluster-wide commands answer the same on each)."""
        return self.running().rabbitmqctl(*args, timeout=timeout)

    def running_nodes(self) -> set[str]:
        """The nodes that run together in this cluster, as a running node sees them."""
        return set(json.loads(self.rabbitmqctl("cluster_status", "--formatter", "json"))["running_nodes"])

    def by_name(self, node: str) -> LocalNode:
        """The node called ``node`` (name@localhost, as rabbitmqctl and the management API say it)."""
        for candidate in self.nodes:
            if candidate.node == node:
                return candidate
        raise KeyError(f"{node} is not a node of this cluster ({[n.node for n in self.nodes]})")

    def kill(self, node: LocalNode) -> None:
        """SIGKILL one node, as a crash would; the others go on without it."""
        node.kill()

    def restart(self, node: LocalNode, timeout: float = 60.0) -> None:
        """Start a stopped or killed node again and wait until it runs in the cluster (it rejoins from its data)."""
        node.start()
        deadline = time.monotonic() + timeout
        while node.node not in self.running_nodes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {node.node} started but did not rejoin its cluster within "
                                   f"{timeout:.0f} s; its log {node.log_file} says why")
            time.sleep(0.5)

    def close(self) -> None:
        """Kill every node and remove their folders."""
        for node in self.nodes:
            node.close()


def node_name() -> str:
    """A fresh throwaway node's name: its folder's too, and the pid in it lets reap_orphan_nodes find it."""
    return f"fedq-{os.getpid()}-{secrets.token_hex(3)}"


def default_base_dir() -> Path:
    """Where throwaway nodes keep their folders: per user, so two users' runs do not collide."""
    base = Path(tempfile.gettempdir()) / f"fedq-rabbitmq-{os.geteuid()}"
    base.mkdir(exist_ok=True)
    # As root the nodes run as rabbitmq, which must be able to enter this folder.
    base.chmod(0o755)
    return base


def reap_orphan_nodes(base_dir: Path | None = None) -> None:
    """Kill and remove the nodes of earlier runs whose process died without cleaning up (SIGKILL, os._exit)."""
    for folder in Path(base_dir or default_base_dir()).glob("fedq-*-*"):
        owner = folder.name.split("-")[1]
        if owner.isdigit() and not _pid_alive(int(owner)):
            if (pid := _beam_pid(folder)) is not None:
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(folder, ignore_errors=True)


# Throwaway brokers, local nodes and containers, still running: closed at exit if their owner did not.
_LIVE_NODES: set[LocalNode | ContainerNode] = set()


@atexit.register
def _close_live_nodes() -> None:
    for node in list(_LIVE_NODES):
        try:
            node.close()
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say what is left behind
            print(f"fedq: could not close {node.left_behind}: {exc}", file=sys.stderr)


@dataclass
class Broker:
    """A reachable RabbitMQ broker and what is needed to make fresh vhosts on it."""

    kind: str  # "env" | "container" | "local-node" | "local-cluster" | "system"
    host: str
    port: int
    username: str
    password: str
    management_url: str | None  # http://host:port, no credentials inside; None without management
    node: LocalNode | ContainerNode | None = None
    cluster: LocalCluster | None = None  # kind "local-cluster": its nodes, to kill and restart
    vhost: str = DEV_VHOST  # the vhost url() names by default
    scheme: str = "amqp"
    config_dir: Path = DEFAULT_CONFIG_DIR
    management_auth: tuple[str, str] | None = field(default=None, repr=False)  # if not username/password
    #: The other nodes of a cluster, (host, port) each; url() names them after host:port.
    other_nodes: tuple[tuple[str, int], ...] = ()
    _rabbitmqctl: Callable[..., str] | None = field(default=None, repr=False)
    _on_close: Callable[[], None] | None = field(default=None, repr=False)

    def url(self, vhost: str | None = None) -> str:
        """AMQP URL of `vhost` (default: this broker's own vhost) with every part percent-encoded; for a
        cluster, one per node, separated by commas, as FEDQ_BROKER_URL takes them."""
        q = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
        credentials = f"{q(self.username)}:{q(self.password)}"
        nodes = [(self.host, self.port), *self.other_nodes]
        return ",".join(f"{self.scheme}://{credentials}@{host}:{port}/{q(vhost or self.vhost)}" for host, port in nodes)

    def management_api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the management HTTP API (path like "/api/queues/fedq"); return the decoded JSON, if any."""
        if self.management_url is None:
            raise RuntimeError(f"the {self.kind} broker at {self.host}:{self.port} has no management API")
        user, password = self.management_auth or (self.username, self.password)
        return management_call(self.management_url, user, password, method, path, body)

    def create_vhost(self, name: str) -> str:
        """Create a fresh vhost, give this broker's user full permissions, and load into it the vhost-scoped
        definitions of broker_config/definitions.json (exchanges, queues, bindings, policies of vhost "fedq").
        Returns the vhost's amqp URL."""
        defs = vhost_definitions(self.config_dir)
        v, u = urllib.parse.quote(name, safe=""), urllib.parse.quote(self.username, safe="")
        if self.management_url is not None:
            load_vhost_definitions(self.management_url, *(self.management_auth or (self.username, self.password)), name,
                                   self.config_dir)
            everything = {"configure": ".*", "write": ".*", "read": ".*"}
            self.management_api("PUT", f"/api/permissions/{v}/{u}", everything)
        elif self._rabbitmqctl is not None:
            self._rabbitmqctl("add_vhost", name)
            self._rabbitmqctl("set_permissions", "-p", name, self.username, ".*", ".*", ".*")
            for p in defs["policies"]:
                self._rabbitmqctl(
                    "set_policy", "-p", name, "--apply-to", p["apply-to"], "--priority", str(p["priority"]),
                    p["name"], p["pattern"], json.dumps(p["definition"]),
                )
            _declare(self.url(name), defs)
        else:
            raise RuntimeError(
                f"cannot create vhost {name!r} on the {self.kind} broker at {self.host}:{self.port}: it has no "
                "management API and no rabbitmqctl here; set FEDQ_BROKER_MANAGEMENT_URL=http://user:pass@host:15672"
            )
        return self.url(name)

    @contextmanager
    def temporary_vhost(self, name: str) -> Iterator[str]:
        """``create_vhost`` for the length of a block (a test, a benchmark run); its URL."""
        url = self.create_vhost(name)
        try:
            yield url
        finally:
            self.delete_vhost(name)

    def delete_vhost(self, name: str) -> None:
        """Delete a vhost and everything in it; a missing vhost is not an error."""
        if self.management_url is not None:
            try:
                self.management_api("DELETE", f"/api/vhosts/{urllib.parse.quote(name, safe='')}")
            except ManagementError as exc:
                if "answered 404" not in str(exc):
                    raise
        elif self._rabbitmqctl is not None:
            try:
                self._rabbitmqctl("delete_vhost", name)
            except RuntimeError as exc:
                if "does not exist" not in str(exc):
                    raise

    def close(self) -> None:
        """Stop what this object started (node, container, own vhost on the system broker)."""
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


def _declare(url: str, defs: dict[str, list[dict[str, Any]]]) -> None:
    link = transport.connect(url, 30, "fedq-broker-setup")
    try:
        transport.declare_definitions(link.channel(), defs)
    finally:
        link.close()


def _split_credentials(url: str) -> tuple[urllib.parse.SplitResult, str, str]:
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    return parts, user, password


def _env_broker(url: str, management: str | None, config_dir: Path) -> Broker:
    try:
        check_broker_urls(url)
    except ValueError as exc:
        raise RuntimeError(f"FEDQ_BROKER_URL={redact_url(url)} is not usable: {exc}") from None
    nodes, schemes = [], {one.split("://", 1)[0] for one in broker_urls(url)}
    if len(schemes) > 1:
        # Broker.url() writes one scheme for every node (the vhosts it creates are reached that way).
        raise RuntimeError(f"FEDQ_BROKER_URL={redact_url(url)} mixes amqp:// and amqps://; for tests and benchmarks "
                           "name every node the same way")
    for one in broker_urls(url):
        parts, user, password = _split_credentials(one)
        if not parts.hostname:
            raise RuntimeError(f"FEDQ_BROKER_URL={redact_url(url)} names no host in {redact_url(one)}; write "
                               "amqp://user:pass@host:port/vhost, one per node of a cluster, separated by commas")
        nodes.append((parts.hostname, parts.port or (5671 if parts.scheme == "amqps" else 5672)))
    if (error := transport.probe(url)) is not None:
        raise RuntimeError(
            f"FEDQ_BROKER_URL={redact_url(url)} does not accept a connection ({error!r}); "
            "fix it, or unset it to let fedq find or start a broker"
        )
    management_url, management_auth = None, None
    if management:
        m, m_user, m_password = _split_credentials(management)
        management_url = f"{m.scheme}://{m.hostname}:{m.port or 15672}{m.path.rstrip('/')}"
        management_auth = (m_user, m_password) if m.username else None
    (host, port), *others = nodes
    return Broker(
        kind="env", host=host, port=port, username=user, password=password, management_url=management_url,
        vhost=urllib.parse.unquote(parts.path[1:]) if parts.path not in ("", "/") else "/",
        scheme=parts.scheme, config_dir=config_dir, management_auth=management_auth, other_nodes=tuple(others),
    )


def broker_image() -> str:
    """The RabbitMQ image of the container path: FEDQ_BROKER_IMAGE, or the official management image."""
    return os.environ.get("FEDQ_BROKER_IMAGE") or CONTAINER_IMAGE


def _image_unavailable_reason(client: Any, image: str) -> str | None:
    """None when the engine has `image` or its registry can serve it; otherwise why not."""
    import docker.errors

    try:
        client.images.get(image)
        return None
    except docker.errors.ImageNotFound:
        pass
    # Asks the registry for the manifest only: says within the client's timeout whether a pull would
    # work, where a pull itself would take as long as the download (or the engine's own dial timeout).
    try:
        client.api.inspect_distribution(image)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means the image cannot be had
        return f"image {image} is not in the Docker engine and cannot be pulled ({_first_line(exc)})"


def _first_line(exc: Exception) -> str:
    # The engine's own words (APIError.explanation) say why, without the HTTP request wrapped round them.
    lines = str(getattr(exc, "explanation", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def container_unavailable_reason(image: str) -> str | None:
    """None when a Docker engine answers and has or can pull `image`; otherwise why the container path
    cannot be used. An engine that answers is not enough: with no registry it cannot start a container
    from an image it lacks. Disables testcontainers' Ryuk when its image cannot be had."""
    try:
        import docker

        client = docker.from_env(timeout=ENGINE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable Docker engine"
        return f"no Docker engine ({_first_line(exc)})"
    try:
        try:
            client.ping()
        except Exception as exc:  # noqa: BLE001
            return f"no Docker engine ({_first_line(exc)})"
        if (reason := _image_unavailable_reason(client, image)) is not None:
            return (f"{reason}; pull or build it, or set FEDQ_BROKER_IMAGE to an image the engine has "
                    "(scripts/docker-engine.sh builds fedq/rabbitmq-offline:3.10 with no registry)")
        _disable_ryuk_unless_available(client)
        return None
    finally:
        client.close()


def _disable_ryuk_unless_available(client: Any) -> None:
    # Ryuk removes containers when the process dies; without it, _close_live_nodes does at exit.
    from testcontainers.core.config import testcontainers_config

    if testcontainers_config.ryuk_disabled:
        return
    if _image_unavailable_reason(client, testcontainers_config.ryuk_image) is not None:
        os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
        testcontainers_config.ryuk_disabled = True


class ContainerNode:
    """A throwaway RabbitMQ broker in a container started by testcontainers, with broker_config/ copied in.
    Its ports are published on 127.0.0.1 only, and stay the same across restart()."""

    def __init__(self, config_dir: Path, image: str | None = None, *,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls`` = (CA certificate, server certificate, server key) also opens broker_config/tls.conf's listener."""
        self.config_dir = Path(config_dir)
        self.image = image or broker_image()
        self.tls = tls
        self.plugins = _enabled_plugins(self.config_dir)
        self.amqp_port = _free_port()
        self.management_port = _free_port()
        self.tls_port = _free_port() if tls else None
        self.node = f"fedq-{os.getpid()}-{secrets.token_hex(3)}"
        self._container: Any = None

    @property
    def has_management(self) -> bool:
        return "rabbitmq_management" in self.plugins

    def _make_container(self) -> Any:
        from testcontainers.core.container import DockerContainer

        overrides = {"listeners.tcp.default": "5672", "load_definitions": "/etc/rabbitmq/definitions.json"}
        if self.has_management:
            overrides["management.tcp.port"] = "15672"
        conf = _rewrite_conf((self.config_dir / "rabbitmq.conf").read_text(), overrides)
        # Not RabbitMqContainer: its readiness probe connects to the engine's idea of the host's address
        # (the bridge gateway when this process itself runs in a container), where nothing is published.
        container = DockerContainer(self.image, name=self.node)
        # with_bind_ports cannot name an address, and exposed ports are published on every interface.
        container.ports[5672] = ("127.0.0.1", self.amqp_port)
        if self.has_management:
            container.ports[15672] = ("127.0.0.1", self.management_port)
        # Copied rather than bind-mounted: the engine need not see this checkout.
        container.with_copy_into_container(conf.encode(), "/etc/rabbitmq/rabbitmq.conf")
        for name in ("definitions.json", "enabled_plugins"):
            container.with_copy_into_container(self.config_dir / name, f"/etc/rabbitmq/{name}")
        if self.tls:
            container.ports[5671] = ("127.0.0.1", self.tls_port)
            for path, name in zip(self.tls, ("ca.pem", "server.pem", "server.key")):
                container.with_copy_into_container(Path(path), f"/etc/rabbitmq/tls/{name}")
            container.with_copy_into_container((self.config_dir / "tls.conf").read_bytes(),
                                               "/etc/rabbitmq/conf.d/10-tls.conf")
        return container

    def start(self, timeout: float = BOOT_SECONDS) -> None:
        """Start the container (again, on its data, after stop() or kill()) and wait until it serves clients."""
        if self._container is None:
            self._container = self._make_container()
            _LIVE_NODES.add(self)
            try:
                self._container.start()
                self._wait_ready(timeout)
            except BaseException:
                self.close()
                raise
            return
        self._container.get_wrapped_container().start()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"amqp://{DEV_USER}:{DEV_PASSWORD}@127.0.0.1:{self.amqp_port}/{DEV_VHOST}"
        # The definitions create fedq/fedq and vhost fedq (no guest): ready means fedq can log in there.
        while (error := transport.probe(url)) is not None:
            if time.monotonic() > deadline:
                logs = self._container.get_wrapped_container().logs(tail=15).decode(errors="replace")
                raise RuntimeError(
                    f"RabbitMQ container {self.node} ({self.image}) did not serve AMQP on 127.0.0.1:{self.amqp_port} "
                    f"within {timeout:.0f} s (last error {error!r}). Its log ends with:\n{logs}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the container gracefully, keeping its data."""
        self._container.get_wrapped_container().stop(timeout=30)

    def restart(self) -> None:
        """Stop and start again on the same data and ports."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; start() recovers from its data."""
        self._container.get_wrapped_container().kill()

    @property
    def left_behind(self) -> str:
        """What stays if closing fails, and how to remove it."""
        return f"RabbitMQ container {self.node} (remove it with `docker rm -f {self.node}`)"

    def close(self) -> None:
        """Remove the container and its data."""
        if self._container is not None:
            self._container.stop()
        _LIVE_NODES.discard(self)


def start_container_broker(config_dir: Path, image: str | None = None) -> Broker:
    node = ContainerNode(config_dir, image)
    node.start()
    return Broker(
        kind="container", host="127.0.0.1", port=node.amqp_port, username=DEV_USER, password=DEV_PASSWORD,
        management_url=f"http://127.0.0.1:{node.management_port}" if node.has_management else None,
        node=node, config_dir=config_dir, _on_close=node.close,
    )


def _local_node_broker(config_dir: Path, node: LocalNode) -> Broker:
    try:
        node.start()
    except BaseException:
        node.close()
        raise
    return Broker(
        kind="local-node", host="127.0.0.1", port=node.amqp_port, username=DEV_USER, password=DEV_PASSWORD,
        management_url=f"http://127.0.0.1:{node.management_port}" if node.has_management else None,
        node=node, config_dir=config_dir, _rabbitmqctl=node.rabbitmqctl, _on_close=node.close,
    )


def start_local_cluster(config_dir: Path | None = None, *, log: Callable[[str], object] = print) -> Broker:
    """Start a local three-node RabbitMQ cluster from broker_config/ (rabbitmq.conf and cluster.conf); its
    Broker's url() lists the three nodes. For tests and benchmarks of failover; close() throws it away."""
    config_dir = Path(config_dir or DEFAULT_CONFIG_DIR)
    if not LocalNode.available():
        raise RuntimeError(f"no RabbitMQ in {RABBITMQ_BIN} (and, as root, no rabbitmq user) to start a local cluster "
                           "from; `apt-get install rabbitmq-server`")
    reap_orphan_nodes()
    cluster = LocalCluster(config_dir)
    log(f"fedq broker: starting a local three-node RabbitMQ cluster ({', '.join(n.node for n in cluster.nodes)}; "
        f"AMQP ports {', '.join(str(n.amqp_port) for n in cluster.nodes)})")
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    first, *others = cluster.nodes
    return Broker(
        kind="local-cluster", host="127.0.0.1", port=first.amqp_port, username=DEV_USER, password=DEV_PASSWORD,
        management_url=f"http://127.0.0.1:{first.management_port}" if first.has_management else None,
        cluster=cluster, config_dir=config_dir, _rabbitmqctl=cluster.rabbitmqctl, _on_close=cluster.close,
        other_nodes=tuple(("127.0.0.1", node.amqp_port) for node in others),
    )


def _system_rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        [str(SYSTEM_RABBITMQCTL), *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{SYSTEM_RABBITMQCTL} {' '.join(args)} failed (exit {result.returncode}):\n"
            f"{result.stderr.strip()}\n{result.stdout.strip()}"
        )
    return result.stdout


def _system_broker(config_dir: Path) -> Broker:
    broker = Broker(
        kind="system", host=SYSTEM_HOST, port=SYSTEM_PORT, username="guest", password="guest",
        management_url=SYSTEM_MANAGEMENT_URL, config_dir=config_dir,
        _rabbitmqctl=_system_rabbitmqctl if os.access(SYSTEM_RABBITMQCTL, os.X_OK) else None,
    )
    try:
        broker.management_api("GET", "/api/overview")
    except RuntimeError:
        broker.management_url = None
    # Never touch the system broker's existing vhosts: work in a vhost of our own, deleted on close.
    vhost = f"fedq-{os.getpid()}-{secrets.token_hex(3)}"
    broker.create_vhost(vhost)
    broker.vhost = vhost
    broker._on_close = lambda: broker.delete_vhost(vhost)
    return broker


def find_broker(config_dir: Path | None = None, *, log: Callable[[str], object] = print,
                container: bool = True) -> Broker:
    """Find or start a real RabbitMQ broker: FEDQ_BROKER_URL, a Docker container from FEDQ_BROKER_IMAGE, a
    throwaway local node, or a fresh vhost on the system broker at 127.0.0.1:5672, in that order (without
    the container when ``container`` is false). Logs one line saying which and why.
    config_dir defaults to the project's broker_config/ folder."""
    config_dir = Path(config_dir or DEFAULT_CONFIG_DIR)
    env_url = os.environ.get("FEDQ_BROKER_URL")
    if env_url:
        broker = _env_broker(env_url, os.environ.get("FEDQ_BROKER_MANAGEMENT_URL"), config_dir)
        log(f"fedq broker: FEDQ_BROKER_URL is set: using {redact_url(env_url)}")
        return broker
    image = broker_image()
    if container:
        no_container = container_unavailable_reason(image)
        if no_container is None:
            log(f"fedq broker: a Docker engine answers and has or can pull {image}: starting a container")
            return start_container_broker(config_dir, image)
    else:
        no_container = "no container asked for"
    # A node that fails to start means broken broker_config/ or a broken machine: raise, do not fall through.
    if LocalNode.available():
        reap_orphan_nodes()
        node = LocalNode(config_dir)
        log(
            f"fedq broker: {no_container}: starting a local RabbitMQ node from {RABBITMQ_BIN.parent} "
            f"({node.node}, AMQP 127.0.0.1:{node.amqp_port}, management {node.management_port}, folder {node.folder})"
        )
        return _local_node_broker(config_dir, node)
    if transport.probe(f"amqp://guest:guest@{SYSTEM_HOST}:{SYSTEM_PORT}/%2F") is None:
        log(f"fedq broker: {no_container} and no RabbitMQ in {RABBITMQ_BIN}: using the system broker on "
            f"{SYSTEM_HOST}:{SYSTEM_PORT} in a fresh vhost")
        return _system_broker(config_dir)
    raise RuntimeError(
        f"No RabbitMQ broker: FEDQ_BROKER_URL is unset, {no_container}, no RabbitMQ binaries in {RABBITMQ_BIN}, "
        f"and nothing accepts guest/guest on {SYSTEM_HOST}:{SYSTEM_PORT}. Set FEDQ_BROKER_URL, start Docker, "
        "or `apt-get install rabbitmq-server`."
    )
