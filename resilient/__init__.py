"""
resilient: policy-driven resilience for sync and async Python calls.

    import resilient

    resilient.load_policies("resilience.yaml")

    @resilient.resilient(policy="broker")
    async def place_order(order): ...
"""

from __future__ import annotations

from resilient._models import (
    TRANSIENT_ERRORS as TRANSIENT_ERRORS,
)
from resilient._models import (
    CircuitBreakerConfig as CircuitBreakerConfig,
)
from resilient._models import (
    FallbackConfig as FallbackConfig,
)
from resilient._models import (
    Policy as Policy,
)
from resilient._models import (
    RetryConfig as RetryConfig,
)
from resilient._models import (
    RetryStrategy as RetryStrategy,
)
from resilient._models import (
    TimeoutConfig as TimeoutConfig,
)
from resilient._version import __version__ as __version__
from resilient.breaker import CircuitBreaker as CircuitBreaker
from resilient.decorator import Attempt as Attempt
from resilient.decorator import AttemptIterator as AttemptIterator
from resilient.decorator import acall as acall
from resilient.decorator import attempts as attempts
from resilient.decorator import call as call
from resilient.decorator import resilient as resilient
from resilient.errors import AttemptTimeoutError as AttemptTimeoutError
from resilient.errors import BulkheadFullError as BulkheadFullError
from resilient.errors import CircuitOpenError as CircuitOpenError
from resilient.errors import PolicyError as PolicyError
from resilient.errors import RateLimitedError as RateLimitedError
from resilient.errors import RejectedError as RejectedError
from resilient.errors import ResilienceError as ResilienceError
from resilient.events import subscribe as subscribe
from resilient.events import unsubscribe as unsubscribe
from resilient.pipeline import breakers as breakers
from resilient.pipeline import get_breaker as get_breaker
from resilient.policy import get_policy as get_policy
from resilient.policy import load_policies as load_policies
from resilient.policy import policy_names as policy_names

__all__ = (
    # the decorator and its call and block forms
    "resilient",
    "call",
    "acall",
    "attempts",
    "Attempt",
    "AttemptIterator",
    # policies
    "load_policies",
    "get_policy",
    "policy_names",
    "Policy",
    "CircuitBreakerConfig",
    "RetryConfig",
    "RetryStrategy",
    "TimeoutConfig",
    "FallbackConfig",
    "TRANSIENT_ERRORS",
    # breakers
    "CircuitBreaker",
    "get_breaker",
    "breakers",
    # events
    "subscribe",
    "unsubscribe",
    # errors
    "ResilienceError",
    "PolicyError",
    "RejectedError",
    "CircuitOpenError",
    "BulkheadFullError",
    "RateLimitedError",
    "AttemptTimeoutError",
    "__version__",
)
