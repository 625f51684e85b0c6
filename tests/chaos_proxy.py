"""A TCP proxy between clients and the broker that can cut, stall or slow connections on command.

It forwards bytes untouched, so clients speak real AMQP to a real broker; only the link misbehaves,
as a site's VPN or a flaky uplink would.
"""

from __future__ import annotations

import socket
import threading
import time


class ChaosProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._links: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()  # cleared while stalled
        self.bytes_per_second: float | None = None
        self.cuts = 0
        self.down = False  # while set, new connections are refused, as from a site that is offline
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="chaos-accept").start()

    def url(self, broker_url: str) -> str:
        """The same AMQP URL, pointed at the proxy."""
        prefix, _, rest = broker_url.partition("@")
        hostport, _, vhost = rest.partition("/")
        return f"{prefix}@127.0.0.1:{self.port}/{vhost}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._links.append((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True, name="chaos-pump").start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._open.wait()
                if self.bytes_per_second:
                    time.sleep(len(data) / self.bytes_per_second)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> int:
        """Drop every open connection at once, as a lost link would; returns how many were cut."""
        with self._lock:
            links, self._links = self._links, []
        for pair in links:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self.cuts += 1
        return len(links)

    def go_down(self) -> None:
        """Cut every connection and refuse new ones until ``come_back``."""
        self.down = True
        self.cut()

    def come_back(self) -> None:
        self.down = False

    def stall(self, seconds: float) -> None:
        """Hold all traffic for ``seconds`` (connections stay open), then let it flow again."""
        self._open.clear()
        threading.Timer(seconds, self._open.set).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._open.set()
        self.cut()
