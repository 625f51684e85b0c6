"""Connections to the broker: opening one (TLS included), driving it, and making a new one when it is lost.

pika's BlockingConnection answers heartbeats only while the thread that owns it drives it, so every
fedq process drives its ``Link`` the whole time (``serve``) and does long work on other threads.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from shared.settings import broker_urls

log = logging.getLogger(__name__)
T = TypeVar("T")


class TLSSetupError(RuntimeError):
    """TLS cannot work as configured (certificate not trusted, or not a TLS port); retrying will not help."""


# Failures a new connection can cure. Bad credentials and refused permissions are not among them
# (refused_by_broker): retrying those only hides the mistake, so they stop the process with pika's
# own message. Nor is a TLS set-up error, which is no OSError.
RECOVERABLE = (
    pika.exceptions.AMQPConnectionError,
    # The broker cancelled a consumer: its queue was deleted (by an operator, or by a fedq that replaced
    # it); a new connection declares it again.
    pika.exceptions.ConsumerCancelled,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.NackError,
    OSError,
)
REFUSALS = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError)
#: The broker could not be reached or dropped the connection while it was being opened.
ConnectionFailed = pika.exceptions.AMQPConnectionError
#: The broker closed a channel, with a reply code and text saying why (403: not permitted, 404: no such object).
ChannelClosed = pika.exceptions.ChannelClosedByBroker


class Link:
    """One AMQP connection, owned and driven by the thread that opened it."""

    def __init__(self, connection: pika.BlockingConnection):
        self._connection = connection

    def channel(self) -> BlockingChannel:
        """A new channel on this connection."""
        return self._connection.channel()

    def serve(self, seconds: float) -> None:
        """Drive the connection for up to ``seconds``: heartbeats, confirms and consumer callbacks."""
        self._connection.process_data_events(time_limit=seconds)

    def serve_until(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive the connection until ``ready()`` or ``timeout`` seconds; returns ``ready()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready() and (deadline is None or time.monotonic() < deadline):
            self.serve(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
        return ready()

    def run_while_serving(self, work: Callable[[], T], name: str,
                          on_lost: Callable[[BaseException], None] = lambda exc: None) -> tuple[T, BaseException | None]:
        """Run ``work`` on a thread of its own while this thread drives the connection, so that work
        of any length (training, evaluation) costs no heartbeat.

        Returns the work's result and the connection failure met meanwhile, if any (told to
        ``on_lost`` as it happens): the work still finishes, and the caller decides when to raise the
        failure. The work's own exception is raised here.
        """
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = work()
            except BaseException as exc:  # re-raised on the connection's thread below
                outcome["error"] = exc
            finally:
                self.wake()  # the loop below goes on now, not at its time limit

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        lost = None
        while thread.is_alive() and lost is None:
            try:
                if not self.is_open:  # lost before the work began: pika cannot even wait on it
                    raise pika.exceptions.ConnectionWrongStateError("the connection is closed")
                self.serve(1.0)
            except RECOVERABLE as exc:
                lost = exc
                on_lost(exc)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"], lost

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` while the connection stays alive."""
        self._connection.sleep(seconds)

    def wake(self) -> None:
        """From any thread: make the owner's ``serve`` return now rather than at its time limit."""
        try:
            self._connection.add_callback_threadsafe(lambda: None)
        except Exception:  # noqa: BLE001 - the connection is gone; its owner notices on its own
            pass

    @property
    def is_open(self) -> bool:
        return self._connection.is_open

    @property
    def broker_version(self) -> str | None:
        """The version the broker announced when the connection opened (None if it named none)."""
        version = self._connection._impl.server_properties.get("version")  # pika keeps them on the inner connection
        return version.decode() if isinstance(version, bytes) else version

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


# RabbitMQ releases with a defect that costs a federation: (the ranges of releases with it, first
# affected to first fixed; what it costs and what to do). Release notes name the fix; a range starts
# at its series' first release, for a series whose earlier releases were not checked one by one.
# Each snapshot read is one stream reader, on a channel of its own, on the node that serves it: a soak
# on 3.10.8 (benchmarks/soak.py) kept 4,615 ended readers' counters, 21 MB, on one node after 14 minutes.
BROKER_DEFECTS = [
    ([((3, 10, 0), (3, 10, 11)), ((3, 11, 0), (3, 11, 3))],
     ("keeps the metric counters of every stream reader that has ended, about 4.7 KB on the serving node per "
      "snapshot read, until the node restarts (\"Stream unsubscription leaked metric counters\", fixed in 3.10.11 "
      "and 3.11.3): upgrade the broker, or restart its nodes one at a time now and then")),
]


def broker_defects(version: str | None) -> list[str]:
    """What BROKER_DEFECTS says of a RabbitMQ ``version`` ("3.10.8"), as sentences; none for a version
    outside every range, or one that cannot be read."""
    try:
        release = tuple(int(part) for part in (version or "").split("+")[0].split("-")[0].split("."))
    except ValueError:
        return []
    return [f"RabbitMQ {version} {cost}" for ranges, cost in BROKER_DEFECTS
            if any(first <= release < fixed for first, fixed in ranges)]


def _parameters(url: str) -> list[pika.URLParameters]:
    """pika's parameters for each address in ``url`` (one AMQP URL, or a cluster's, comma-separated)."""
    return [pika.URLParameters(one) for one in broker_urls(url)]


def connect(
    url: str, heartbeat: int, name: str, *, ca_file: Path | None = None, cert_file: Path | None = None,
    key_file: Path | None = None,
) -> Link:
    """Open a connection named ``name`` (shown in the management UI) to the node at ``url``, or to
    any node that answers when ``url`` lists a cluster's nodes.

    amqps:// URLs use TLS with the broker's certificate always verified, against ``ca_file`` or the
    system's trust store; ``cert_file``/``key_file`` present a client certificate.
    """
    nodes = list(zip(broker_urls(url), _parameters(url)))
    # Shuffled on every connect: sites spread over the nodes, and one whose node died tries the others
    # on its next connect (a dead node refuses at once, so trying it costs little).
    random.shuffle(nodes)
    configs = [params for _, params in nodes]
    context = None
    for one, params in nodes:
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = 300
        params.client_properties = {"connection_name": name}
        if one.startswith("amqps://"):
            if context is None:
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                if cert_file:
                    context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
            params.ssl_options = pika.SSLOptions(context, params.host)
    # pika tries each in turn and raises what the last one met.
    where = f"the broker at {_addresses(configs)}" if len(configs) == 1 else f"a node of {_addresses(configs)}"
    try:
        return Link(pika.BlockingConnection(configs))
    except ssl.SSLCertVerificationError as exc:
        raise TLSSetupError(
            f"{where} presented a certificate that {ca_file or 'the system trust store'} does not trust "
            f"({exc.verify_message}); set FEDQ_TLS_CA_FILE to the CA that signed the broker's certificate"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason != "WRONG_VERSION_NUMBER":
            raise
        raise TLSSetupError(
            f"{where} does not speak TLS; amqps:// needs the broker's TLS port (5671 by default)"
        ) from None


def probe(url: str, timeout: float = 3.0) -> Exception | None:
    """Why no connection to ``url`` (any of its nodes) can be opened within ``timeout`` seconds each,
    or None if one can."""
    configs = _parameters(url)
    for params in configs:
        params.connection_attempts, params.socket_timeout, params.blocked_connection_timeout = 1, timeout, timeout
    try:
        pika.BlockingConnection(configs).close()
    except pika.exceptions.AMQPError as exc:
        return exc
    return None


def _addresses(configs: list[pika.URLParameters]) -> str:
    return ",".join(f"{params.host}:{params.port}" for params in configs)


def broker_address(url: str) -> str:
    """Where an AMQP URL points, without its credentials: host:port/vhost, or host:port,host:port/vhost
    for a cluster's nodes (one vhost: check_broker_urls)."""
    configs = _parameters(url)
    return f"{_addresses(configs)}/{configs[0].virtual_host}"


def broker_user(url: str) -> str:
    """The user name in an AMQP URL (the same in each of a cluster's), sent as user_id so the broker
    vouches for the sender."""
    return _parameters(url)[0].credentials.username


def refused_by_broker(exc: BaseException) -> bool:
    """Whether the broker itself refused the login or the vhost.

    pika reports any connection lost while logging in as a probable refusal, with the cause's repr
    as its message. Only a cause that is the broker's own Connection.Close (403 or 530) is one; a
    link cut at that moment is a lost connection like any other, and is retried.
    """
    return isinstance(exc, REFUSALS) and str(exc.args[0] if exc.args else "").startswith("ConnectionClosedByBroker")


def _recovering(exc: BaseException) -> bool:
    """A queue the broker has not finished recovering after a restart (404 '... is down or
    inaccessible'), or a stream read from a cluster node that holds no replica of it yet (406 '...
    does not have a replica on the local node': a node that rejoined after a crash, seen to stop two
    sites of three in the failover test); a new connection, to another node or later, gets past it."""
    if not isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return False
    return ((exc.reply_code == 404 and "down or inaccessible" in exc.reply_text)
            or (exc.reply_code == 406 and "does not have a replica on the local node" in exc.reply_text))


class Backoff:
    """Exponential backoff with full jitter, bounded: 0.5 s, 1 s, 2 s ... up to ``maximum``."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None):
        self.initial, self.maximum = initial, maximum
        self.rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self.failures)
        self.failures += 1
        # Full jitter: sites that lost the broker together do not all come back in the same instant.
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def serve_with_reconnect(session: Callable[[Backoff], bool], who: str, stopping: Callable[[], bool]) -> None:
    """Run ``session`` until it returns True, reconnecting with backoff whenever the broker is lost.

    ``session`` opens its own connection, calls ``backoff.reset()`` once connected, and returns True
    when its work is done. ``stopping`` ends the loop instead of a reconnect.
    """
    backoff = Backoff()
    while True:
        try:
            if session(backoff):
                return
        except (*RECOVERABLE, pika.exceptions.ChannelClosedByBroker) as exc:
            if refused_by_broker(exc) or (not isinstance(exc, RECOVERABLE) and not _recovering(exc)):
                raise
            if stopping():
                return
            delay = backoff.next_delay()
            log.warning("%s lost the broker (%s: %s); reconnecting in %.1f s (attempt %d)",
                        who, type(exc).__name__, exc, delay, backoff.failures)
            time.sleep(delay)
