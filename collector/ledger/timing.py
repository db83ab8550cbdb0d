"""How long each unit of work takes on each shard, for ``/metrics``.

A store's ``transaction`` method is decorated with :func:`timed_transaction`; when an
observer has been attached to the store with :func:`observe_transactions`, every unit
of work reports the store's name, its duration in seconds (monotonic clock) and
whether it committed. With no observer attached nothing is measured.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# (store name, seconds, committed)
TransactionObserver = Callable[[str, float, bool], None]

_OBSERVER = "_meterd_transaction_observer"


class _Named(Protocol):
    name: str


S = TypeVar("S", bound=_Named)


def observe_transactions(store: Any, observer: TransactionObserver | None) -> None:
    """Report every unit of work of ``store`` to ``observer`` (None: stop)."""
    setattr(store, _OBSERVER, observer)


class _Timed(AbstractAsyncContextManager[T]):
    def __init__(self, inner: AbstractAsyncContextManager[T], store: _Named,
                 observer: TransactionObserver) -> None:
        self._inner = inner
        self._store = store
        self._observer = observer
        self._started = 0.0

    async def __aenter__(self) -> T:
        self._started = time.perf_counter()
        return await self._inner.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        committed = False
        try:
            suppressed = await self._inner.__aexit__(exc_type, exc, tb)
            committed = exc_type is None
            return suppressed
        finally:
            self._observer(self._store.name, time.perf_counter() - self._started, committed)


def timed_transaction(
    method: Callable[[S], AbstractAsyncContextManager[T]],
) -> Callable[[S], AbstractAsyncContextManager[T]]:
    """Decorate a store's ``transaction`` method (outermost, above
    ``@asynccontextmanager``) so its units of work can be observed."""

    @functools.wraps(method)
    def transaction(self: S) -> AbstractAsyncContextManager[T]:
        observer: TransactionObserver | None = getattr(self, _OBSERVER, None)
        inner = method(self)
        return inner if observer is None else _Timed(inner, self, observer)

    return transaction
