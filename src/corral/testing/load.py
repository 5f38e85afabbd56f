"""A bounded load loop for zero-downtime tests: one new connection per request, at a steady
rate, counting every failure (refused, reset, timeout, bad answer)."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    """What a load run saw."""

    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    answered_by: Counter[str] = field(default_factory=Counter)
    failure_times: list[float] = field(default_factory=list)  # seconds since start

    def summary(self) -> str:
        top = ", ".join(f"{k} ×{v}" for k, v in self.errors.most_common(3))
        return f"{self.ok} ok, {self.failed} failed" + (f" ({top})" if top else "")


class Load:
    """Requests to addr:port from a background thread until stopped (or `max_seconds`)."""

    def __init__(self, targets: list[tuple[str, int]], rate: float = 100.0, timeout: float = 3.0,
                 max_seconds: float = 120.0) -> None:
        self.targets = targets
        self.interval = 1.0 / rate
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def __enter__(self) -> Load:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)
        return self.result

    def _one(self, addr: str, port: int) -> None:
        conn = http.client.HTTPConnection(addr, port, timeout=self.timeout)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            self.result.ok += 1
            marker = body.split(b'"task_id": "', 1)
            if len(marker) == 2:
                self.result.answered_by[marker[1].split(b'"', 1)[0].decode()] += 1
        except Exception as exc:  # every kind of failure counts
            self.result.failed += 1
            self.result.errors[type(exc).__name__] += 1
            self.result.failure_times.append(time.monotonic() - self._start)
        finally:
            conn.close()

    def _run(self) -> None:
        i = 0
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - self._start < self.max_seconds:
            addr, port = self.targets[i % len(self.targets)]
            i += 1
            self._one(addr, port)
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()  # running late: don't burst to catch up
