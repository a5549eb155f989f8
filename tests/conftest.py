"""Shared fixtures.

``scenarios``: a module's slow scenarios (whole Flower runs with the assertions made while they are up)
started at once, each in its own thread, so that one run's waiting (Flower polls every few seconds,
Ray and the SuperLink start and stop) overlaps another's work. Each test then waits for its own
scenario: ``scenarios.result(name)`` returns what it returned or re-raises its failure (an
AssertionError keeps its message and traceback). A scenario starts only when a test that needs it
was selected (``pytest -k`` starts nothing else), and the module's tests end only after every
scenario it started has ended (each stops its own processes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest


class Scenarios:
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._selected = {item.originalname for item in request.session.items
                          if getattr(item, "module", None) is request.module}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"scenario-{request.module.__name__}")
        self._futures: dict[str, Future[Any]] = {}

    def wanted(self, tests: Iterable[str]) -> bool:
        """Whether any of these test functions (names without parameters) was selected."""
        return any(t in self._selected for t in tests)

    def start(self, name: str, tests: Iterable[str], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` in the background when one of ``tests`` was selected."""
        if name not in self._futures and self.wanted(tests):
            self._futures[name] = self._pool.submit(fn, *args, **kwargs)

    def result(self, name: str) -> Any:
        """What the scenario returned (waiting for it); its exception, re-raised, when it failed."""
        if name not in self._futures:
            raise RuntimeError(f"scenario {name!r} was not started (is its test listed in start()?)")
        return self._futures[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def scenarios(request: pytest.FixtureRequest):
    runner = Scenarios(request)
    try:
        yield runner
    finally:
        runner.close()
