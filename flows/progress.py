"""Live progress of a training flow for whoever started it in-process (the CLI's view).

The flow reports each finished round here; the CLI subscribes with :func:`listening`.
A deployed flow has no listener and reports only to Prefect and MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

RoundListener = Callable[[str, dict[str, Any]], None]
_listeners: list[RoundListener] = []


@contextmanager
def listening(listener: RoundListener) -> Iterator[None]:
    """Receive ``(event, payload)`` calls while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(event: str, payload: dict[str, Any]) -> None:
    """Tell every listener about an event ('start', 'round', 'end')."""
    for listener in list(_listeners):
        listener(event, payload)
