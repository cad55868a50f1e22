"""The worker thread both serving engines run on: steps while there is work, every accepted row
answered on the way out (a failure answers the rows still waiting with (None, 0))."""

from __future__ import annotations

import threading
from typing import Callable


class Worker:
    """Subclasses give `_has_work()`, `_take_all()` (the callbacks of every row still held, now
    dropped) and `step()`; `submit`-style methods hold `self._cond` and check `self._stopping`."""

    thread_name = "deebert-worker"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _take_all(self) -> list[Callable]:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        """Runs steps on a worker thread until `stop()`."""
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._has_work() and not self._stopping:
                        self._cond.wait()
                    if self._stopping and not self._has_work():
                        return
                self.step()
        except BaseException as e:  # noqa: BLE001 - kept for the server to report; nothing else runs
            self.error = e
            with self._cond:
                self._stopping = True
                failed = self._take_all()
            for callback in failed:  # every accepted row gets an answer, here a failure
                callback(None, 0)
            raise

    def stop(self, timeout: float | None = None) -> None:
        """Refuses new rows, answers every accepted one, then ends the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
