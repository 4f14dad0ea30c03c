"""
Retry budgets: retries capped as a share of calls, so that an outage does not
turn every call into ``max_attempts`` calls (a retry storm).

The model is gRPC's retry throttling and Finagle's ``RetryBudget``: a token
bucket per policy. Each call deposits ``ratio`` tokens, each retry withdraws
one, ``min_retries_per_second`` tokens trickle in with time, and the balance
is capped at ``max_tokens`` (the bucket starts full).

The success path only counts: a deposit is ``next()`` on an
``itertools.count``, which is atomic under the GIL and takes no lock. The
counted deposits (and the time-based trickle) are folded into the balance
under a lock when a retry asks for a token, which happens on the failure path
only. Folding late changes nothing: with no withdrawal in between,
``min(cap, min(cap, b + r) + r) == min(cap, b + 2r)``.

With a Redis backend (resilient.backends) the budget is the fleet's: the
backend's thread reads the call count in the background and adds the deposits
to one bucket in Redis, and a retry takes a token from a small batch that the
process leased from that bucket (one round trip per batch, on the failure path
only). While Redis is unreachable the local bucket below decides, as it always
did (``on_backend_failure: local``; ``open`` refuses retries, ``closed`` allows
them). See docs/distributed.md.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from resilient import _clock
from resilient._models import RetryBudgetConfig
from resilient._shared import SharedByName

if TYPE_CHECKING:
    from resilient.backends.protocol import Backend, BudgetLink

__all__ = ["RetryBudget", "retry_budgets"]


class RetryBudget:
    """
    The retry budget of one policy (or of one ``name=``).

    Attributes:
        deposit: Call once per call (its first attempt); cheap, lock-free.
        retries: Retries allowed so far.
        refused: Retries refused so far.
        backend: The state backend it was attached to (``None``: local only).
        link: The backend's link (``None``: the local bucket always decides).
        fleet_kind: ``"budget"``: what a state backend attaches it as.
    """

    fleet_kind: Final = "budget"

    __slots__ = (
        "_calls",
        "_folded",
        "_last",
        "_lock",
        "_reads",
        "backend",
        "clock",
        "config",
        "deposit",
        "link",
        "name",
        "refused",
        "retries",
        "tokens",
    )

    def __init__(
        self,
        name: str,
        config: RetryBudgetConfig,
        *,
        clock: Callable[[], float] | None = None,
        backend: Backend | None = None,
    ) -> None:
        """
        Create a full budget.

        Args:
            name: The policy (or ``name=``) it belongs to.
            config: The ``retry.budget`` section.
            clock: Monotonic clock in seconds (default: the library's clock seam).
            backend: A state backend to share the budget through (a Redis backend
                makes it the fleet's budget); ``None``: this process only.
        """
        self.name = name
        self.config = config
        self.clock = clock or _clock.monotonic
        self.tokens = config.max_tokens
        self._calls = itertools.count()
        self.deposit: Callable[[], Any] = self._calls.__next__
        self._reads = 0
        self._folded = 0
        self._last = self.clock()
        self._lock = threading.Lock()
        self.retries = 0
        self.refused = 0
        self.backend = backend
        self.link: BudgetLink | None = None
        if backend is not None:
            self.link = backend.attach(self)  # last: the backend reads the budget

    def _fold(self) -> None:
        """Under the lock: turn counted calls and elapsed time into tokens."""
        # Each read is itself one next(); subtract the reads to get the deposits.
        calls = next(self._calls) - self._reads
        self._reads += 1
        now = self.clock()
        cfg = self.config
        tokens = (
            self.tokens
            + (calls - self._folded) * cfg.ratio
            + max(0.0, now - self._last) * cfg.min_retries_per_second
        )
        self._folded = calls
        self._last = now
        self.tokens = tokens if tokens < cfg.max_tokens else cfg.max_tokens

    def try_withdraw(self) -> bool:
        """Take a token for one retry; false (and nothing taken) when under one."""
        link = self.link
        if link is not None:
            granted = link.withdraw()  # the fleet's bucket (None: Redis away, decide here)
            if granted is not None:
                with self._lock:
                    if granted:
                        self.retries += 1
                    else:
                        self.refused += 1
                return granted
        with self._lock:
            self._fold()
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                self.retries += 1
                return True
            self.refused += 1
            return False

    def refund(self) -> None:
        """
        Give back the token of a :meth:`try_withdraw` whose retry did not happen (for
        instance when a second guard refused it): the balance gets it back, up to
        ``max_tokens``, and ``retries`` no longer counts it. With a state backend's
        link, the fleet's token stays spent (a lease is not returned); only the
        count is corrected.
        """
        with self._lock:
            if self.retries > 0:
                self.retries -= 1
            if self.link is None or not self.link.usable:
                self._fold()
                tokens = self.tokens + 1.0
                cap = self.config.max_tokens
                self.tokens = tokens if tokens < cap else cap

    def after_fork(self) -> None:
        """In a forked child (its backend calls it): a new lock, the parent's may be held."""
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """Calls counted so far."""
        with self._lock:
            self._fold()
            return self._folded

    def get_status(self) -> dict[str, Any]:
        """
        Balance, calls, retries allowed and refused (``tokens`` is the local bucket's;
        ``fleet``, with a Redis backend: whether the fleet's bucket decides now).
        """
        with self._lock:
            self._fold()
            status: dict[str, Any] = {
                "name": self.name,
                "tokens": self.tokens,
                "calls": self._folded,
                "retries": self.retries,
                "refused": self.refused,
            }
        if self.link is not None:
            status["fleet"] = self.link.usable
        return status


def _make_budget(
    name: str, config: RetryBudgetConfig, backend: Any, previous: RetryBudget | None
) -> RetryBudget:
    return RetryBudget(name, config, clock=_clock.monotonic, backend=backend)


_BUDGETS: SharedByName[RetryBudget] = SharedByName(
    "retry budget", "retry.budget", _make_budget, uses_backend=True
)
_reset_budgets = _BUDGETS.clear


def retry_budgets() -> dict[str, RetryBudget]:
    """Every retry budget made so far, by policy (or ``name=``)."""
    return _BUDGETS.all()
