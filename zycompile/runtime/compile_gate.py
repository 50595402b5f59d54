"""Compiling a step while another thread runs one is unsafe (Dynamo's and FX's tracing flags are
process-wide: a compiled call during a trace raises "Detected that you are using FX to symbolically
trace a dynamo-optimized function"). The gate lets compiled steps run side by side (``shared``) and
makes a step that may compile (its first call for a shape) wait for them and run alone (``exclusive``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class CompileGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0  # shared holders
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and self._running == 0)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
