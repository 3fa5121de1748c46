"""uvicorn's h11 protocol with read deadlines and a connection cap (slowloris).

uvicorn arms no timer while a request is being read: a client that opens a connection and
sends half a request head, or a body that stops, holds its file descriptor forever. Here:

- head: a request's head must be complete within `header_timeout` seconds of the connection
  opening (on a kept-alive connection, of its first byte; uvicorn's keep-alive timer closes an
  idle one);
- body: while a body is read, bytes must keep coming: at most `body_timeout` seconds between two;
- cap: past `max_connections` open connections (HTTP and WebSocket), the one that has waited
  longest for a request head is closed to make room; when every connection is busy with a
  request, the new one is answered 503 SERVER_BUSY and closed at once, freeing its descriptor.

A timed-out request is answered 408 when no response has started, then closed. uvicorn's
`limit_concurrency` is not used: it answers only once a request head arrives, which a
half-open connection never sends.
"""
from __future__ import annotations

import json
import logging
import os
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("woolly.http")

FD_RESERVE = 64   # descriptors kept free for the model, logs and the listening socket


def _raw_error(status: int, reason: str, code: str, message: str, headers: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "code": code, "details": {}}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{headers}connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus one deadline timer per connection: the head's, or the body's (see module doc)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 512

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = None
        self._received = False   # any byte of the current request head
        self._idle_since = self.loop.time()
        if len(self.connections) > self.max_connections and not self._evict_idle():
            log.warning("connection limit reached (%d open, each serving a request); refusing new connections",
                        self.max_connections)
            transport.write(_raw_error(503, "Service Unavailable", "SERVER_BUSY",
                                       f"the server has {self.max_connections} connections open; retry later",
                                       "retry-after: 1\r\n"))
            transport.close()
            return
        self._arm(self.header_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received = True
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        self._received = False   # before super(): it may go on to a pipelined request
        self._idle_since = self.loop.time()
        self._disarm()           # idle between requests: uvicorn's keep-alive timer runs
        super().on_response_complete()
        if self.conn.their_state is not h11.IDLE:   # a pipelined request was taken up
            self._follow_state()

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()   # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade(event)

    def _waiting_for_head(self) -> bool:
        return (self.conn.their_state is h11.IDLE and not self.transport.is_closing()
                and (self.cycle is None or self.cycle.response_complete))

    def _evict_idle(self) -> bool:
        """Close the connection that has waited longest for a request head; False when there is none."""
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c._waiting_for_head()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._idle_since)
        log.warning("connection limit reached (%d open): closing the one idle longest", self.max_connections)
        victim._disarm()
        victim.transport.close()
        self.connections.discard(victim)   # counted out now, not when the loop gets to connection_lost
        return True

    # -- the deadline follows h11's view of the client ------------------------------------------------
    def _follow_state(self) -> None:
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return self._disarm()
        state = self.conn.their_state
        if state is h11.IDLE:          # a head has begun: its deadline runs from its first byte
            if self._deadline is None and self._received:
                self._arm(self.header_timeout)
        elif state is h11.SEND_BODY:   # reading a body: every read restarts the clock
            self._arm(self.body_timeout)
        else:                          # the request is in: the app's time is not the client's
            self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:      # we stopped reading (the app is behind), not the client
            return self._arm(self.body_timeout)
        in_body = self.conn.their_state is h11.SEND_BODY
        # answer when nothing was answered to this request yet (a head cut short, or a body not yet replied to)
        if (not self.cycle.response_started) if in_body else self._received:
            what = (f"the request body stalled for {self.body_timeout:g}s" if in_body
                    else f"the request head did not arrive within {self.header_timeout:g}s")
            self.transport.write(_raw_error(408, "Request Timeout", "INVALID_REQUEST", what))
        self.transport.close()


def protocol_class(header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """GuardedH11Protocol with these limits, for `uvicorn.run(http=...)`."""
    return type("WoollyH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections})


def connection_cap(max_connections: int) -> int:
    """`max_connections`, lowered to what the descriptor limit allows (raising its soft limit first).

    Refusing a connection needs a descriptor to accept it: the cap stays FD_RESERVE under the limit,
    so `accept()` never fails with EMFILE (Python 3.11's asyncio logs that in a tight loop).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 16
    want = max_connections + in_use + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_connections
    cap = max(1, min(max_connections, soft - in_use - FD_RESERVE))
    if cap < max_connections:
        log.warning("server.max_connections %d lowered to %d: the open-file limit is %d", max_connections, cap, soft)
    return cap
