"""What one client may hold: time limits on each phase of a connection, and a cap on connections.

uvicorn (0.54, its h11 protocol) times out a connection only once it has answered a request on
it (`timeout_keep_alive`): a connection that sends nothing, part of its headers, or one chunk of
its body is held forever, and `limit_concurrency` answers 503 only once a request is complete,
after the connection (a file descriptor) is taken. `guarded_protocol(limits)` is uvicorn's h11
protocol with a deadline per phase, set when the phase starts and never extended by trickled
bytes:

- idle (no byte of the next request yet, on a new or a kept-alive connection): `keep_alive_s`;
- headers (some bytes, headers not complete): `header_timeout_s`;
- body (headers read, the body not complete): `body_timeout_s`;
- the app's work (the request is read): no deadline here (`--max-queue` bounds it, and the
  graceful shutdown timeout bounds a drain).

At the deadline the connection is closed; the app sees a disconnect (rows not yet started are
dropped). Past `max_connections` open connections, the oldest connection that is idle or still
sending its headers is closed to make room (so a crowd of idle sockets cannot keep `/health`
out); when none is, the new connection gets 503 with `Retry-After` and is closed.
"""

from __future__ import annotations

import dataclasses
import json
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 20.0
    keep_alive_s: float = 5.0
    max_connections: int = 2048


def _busy_response() -> bytes:
    body = json.dumps({"error": "too many connections; retry"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            + f"retry-after: {RETRY_AFTER_S}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body)


def guarded_protocol(limits: ConnectionLimits) -> type:
    """uvicorn's h11 protocol class with `limits` (for `uvicorn.Config(http=...)`)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._phase, self._timer, self._since = None, None, time.monotonic()
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections and not self._make_room():
                transport.write(_busy_response())
                transport.close()
                return
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._cancel()
            super().connection_lost(exc)

        # -- the phase and its deadline
        def _current_phase(self) -> str:
            their = self.conn.their_state
            if their is h11.IDLE:
                return "headers" if self.conn.trailing_data[0] else "idle"
            if their is h11.SEND_BODY:
                return "body"
            return "app"

        def _watch(self) -> None:
            if self.transport is None or self.transport.is_closing():
                return
            phase = self._current_phase()
            if phase == self._phase:
                return   # the deadline stands: trickling bytes does not extend it
            self._cancel()
            self._phase, self._since = phase, time.monotonic()
            timeout = {"idle": limits.keep_alive_s, "headers": limits.header_timeout_s,
                       "body": limits.body_timeout_s}.get(phase)
            if timeout is not None:
                self._timer = self.loop.call_later(timeout, self._expire)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()   # the app, if reading a body, sees a disconnect

        def _make_room(self) -> bool:
            """Closes the oldest other connection that is idle or sending headers -> whether one was."""
            waiting = [c for c in self.connections if c is not self and getattr(c, "_phase", None) in ("idle", "headers")
                       and not c.transport.is_closing()]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c._since)
            oldest._cancel()
            oldest.transport.close()
            self.connections.discard(oldest)   # counted as gone now: its connection_lost comes later
            return True

    return GuardedH11Protocol
