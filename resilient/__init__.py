"""
resilient: policy-driven resilience for sync and async Python calls.

    import resilient

    resilient.load_policies("resilience.yaml")

    @resilient.resilient(policy="broker")
    async def place_order(order): ...
"""

from __future__ import annotations

from resilient._logging import disable_logging as disable_logging
from resilient._logging import enable_logging as enable_logging
from resilient._models import PRIORITIES as PRIORITIES
from resilient._models import (
    TRANSIENT_ERRORS as TRANSIENT_ERRORS,
)
from resilient._models import BulkheadConfig as BulkheadConfig
from resilient._models import (
    CircuitBreakerConfig as CircuitBreakerConfig,
)
from resilient._models import (
    FallbackConfig as FallbackConfig,
)
from resilient._models import HealthCheckConfig as HealthCheckConfig
from resilient._models import (
    Policy as Policy,
)
from resilient._models import RateLimitConfig as RateLimitConfig
from resilient._models import RetryBudgetConfig as RetryBudgetConfig
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
from resilient.budget import RetryBudget as RetryBudget
from resilient.budget import retry_budgets as retry_budgets
from resilient.bulkhead import Bulkhead as Bulkhead
from resilient.bulkhead import BulkheadManager as BulkheadManager
from resilient.bulkhead import ConnectionPool as ConnectionPool
from resilient.bulkhead import bulkhead_manager as bulkhead_manager
from resilient.bulkhead import current_priority as current_priority
from resilient.bulkhead import get_bulkhead as get_bulkhead
from resilient.bulkhead import priority as priority
from resilient.decorator import Attempt as Attempt
from resilient.decorator import AttemptIterator as AttemptIterator
from resilient.decorator import acall as acall
from resilient.decorator import acall_sync as acall_sync
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
from resilient.manager import FeatureDisabledError as FeatureDisabledError
from resilient.manager import ResilienceConfig as ResilienceConfig
from resilient.manager import ResilienceManager as ResilienceManager
from resilient.manager import ServiceExistsError as ServiceExistsError
from resilient.manager import ServiceNotFoundError as ServiceNotFoundError
from resilient.manager import create_resilience_manager as create_resilience_manager
from resilient.metrics import PrometheusMetrics as PrometheusMetrics
from resilient.metrics import disable as disable_metrics
from resilient.metrics import enable as enable_metrics
from resilient.pipeline import breakers as breakers
from resilient.pipeline import get_breaker as get_breaker
from resilient.policy import get_policy as get_policy
from resilient.policy import load_policies as load_policies
from resilient.policy import policy_names as policy_names
from resilient.ratelimit import RateLimiter as RateLimiter
from resilient.ratelimit import get_rate_limiter as get_rate_limiter
from resilient.ratelimit import rate_limiters as rate_limiters

__all__ = (
    # the decorator and its call and block forms
    "resilient",
    "call",
    "acall",
    "acall_sync",
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
    "BulkheadConfig",
    "RateLimitConfig",
    "RetryBudgetConfig",
    "PRIORITIES",
    "FallbackConfig",
    "HealthCheckConfig",
    "TRANSIENT_ERRORS",
    # breakers
    "CircuitBreaker",
    "get_breaker",
    "breakers",
    # isolation
    "Bulkhead",
    "BulkheadManager",
    "ConnectionPool",
    "bulkhead_manager",
    "get_bulkhead",
    "priority",
    "current_priority",
    "RateLimiter",
    "get_rate_limiter",
    "rate_limiters",
    "RetryBudget",
    "retry_budgets",
    # the seed's manager
    "create_resilience_manager",
    "ResilienceManager",
    "ResilienceConfig",
    # observability
    "enable_metrics",
    "disable_metrics",
    "PrometheusMetrics",
    "enable_logging",
    "disable_logging",
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
    "ServiceNotFoundError",
    "ServiceExistsError",
    "FeatureDisabledError",
    "__version__",
)
