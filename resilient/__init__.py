"""
resilient: policy-driven resilience for sync and async Python calls.

    import resilient

    resilient.load_policies("resilience.yaml")

    @resilient.resilient(policy="broker")
    async def place_order(order): ...
"""

# Attributes load on first access (PEP 562): `import resilient` costs only this file, and
# the first use of any public name imports what the package used to import eagerly (all
# of it, once, so that import side effects such as the passive-health observer factory are
# in place exactly as before). benchmarks/bench_import.py measures both costs.

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

from resilient._version import __version__ as __version__

if TYPE_CHECKING:
    from resilient._logging import disable_logging as disable_logging
    from resilient._logging import enable_logging as enable_logging
    from resilient._models import PRIORITIES as PRIORITIES
    from resilient._models import TRANSIENT_ERRORS as TRANSIENT_ERRORS
    from resilient._models import AdaptiveConfig as AdaptiveConfig
    from resilient._models import BulkheadConfig as BulkheadConfig
    from resilient._models import ChaosConfig as ChaosConfig
    from resilient._models import CircuitBreakerConfig as CircuitBreakerConfig
    from resilient._models import FallbackConfig as FallbackConfig
    from resilient._models import HealthCheckConfig as HealthCheckConfig
    from resilient._models import HedgeConfig as HedgeConfig
    from resilient._models import HttpConfig as HttpConfig
    from resilient._models import Policy as Policy
    from resilient._models import RateLimitConfig as RateLimitConfig
    from resilient._models import RetryBudgetConfig as RetryBudgetConfig
    from resilient._models import RetryConfig as RetryConfig
    from resilient._models import RetryStrategy as RetryStrategy
    from resilient._models import TimeoutConfig as TimeoutConfig
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
    from resilient.errors import ChaosError as ChaosError
    from resilient.errors import ChaosRefusedError as ChaosRefusedError
    from resilient.errors import ChaosTimeoutError as ChaosTimeoutError
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

# public name -> (module, attribute); a name added to __all__ must be added here too
_EXPORTS: dict[str, tuple[str, str]] = {
    "disable_logging": ("resilient._logging", "disable_logging"),
    "enable_logging": ("resilient._logging", "enable_logging"),
    "PRIORITIES": ("resilient._models", "PRIORITIES"),
    "TRANSIENT_ERRORS": ("resilient._models", "TRANSIENT_ERRORS"),
    "AdaptiveConfig": ("resilient._models", "AdaptiveConfig"),
    "BulkheadConfig": ("resilient._models", "BulkheadConfig"),
    "ChaosConfig": ("resilient._models", "ChaosConfig"),
    "CircuitBreakerConfig": ("resilient._models", "CircuitBreakerConfig"),
    "FallbackConfig": ("resilient._models", "FallbackConfig"),
    "HealthCheckConfig": ("resilient._models", "HealthCheckConfig"),
    "HedgeConfig": ("resilient._models", "HedgeConfig"),
    "HttpConfig": ("resilient._models", "HttpConfig"),
    "Policy": ("resilient._models", "Policy"),
    "RateLimitConfig": ("resilient._models", "RateLimitConfig"),
    "RetryBudgetConfig": ("resilient._models", "RetryBudgetConfig"),
    "RetryConfig": ("resilient._models", "RetryConfig"),
    "RetryStrategy": ("resilient._models", "RetryStrategy"),
    "TimeoutConfig": ("resilient._models", "TimeoutConfig"),
    "CircuitBreaker": ("resilient.breaker", "CircuitBreaker"),
    "RetryBudget": ("resilient.budget", "RetryBudget"),
    "retry_budgets": ("resilient.budget", "retry_budgets"),
    "Bulkhead": ("resilient.bulkhead", "Bulkhead"),
    "BulkheadManager": ("resilient.bulkhead", "BulkheadManager"),
    "ConnectionPool": ("resilient.bulkhead", "ConnectionPool"),
    "bulkhead_manager": ("resilient.bulkhead", "bulkhead_manager"),
    "current_priority": ("resilient.bulkhead", "current_priority"),
    "get_bulkhead": ("resilient.bulkhead", "get_bulkhead"),
    "priority": ("resilient.bulkhead", "priority"),
    "Attempt": ("resilient.decorator", "Attempt"),
    "AttemptIterator": ("resilient.decorator", "AttemptIterator"),
    "acall": ("resilient.decorator", "acall"),
    "acall_sync": ("resilient.decorator", "acall_sync"),
    "attempts": ("resilient.decorator", "attempts"),
    "call": ("resilient.decorator", "call"),
    "resilient": ("resilient.decorator", "resilient"),
    "AttemptTimeoutError": ("resilient.errors", "AttemptTimeoutError"),
    "BulkheadFullError": ("resilient.errors", "BulkheadFullError"),
    "ChaosError": ("resilient.errors", "ChaosError"),
    "ChaosRefusedError": ("resilient.errors", "ChaosRefusedError"),
    "ChaosTimeoutError": ("resilient.errors", "ChaosTimeoutError"),
    "CircuitOpenError": ("resilient.errors", "CircuitOpenError"),
    "PolicyError": ("resilient.errors", "PolicyError"),
    "RateLimitedError": ("resilient.errors", "RateLimitedError"),
    "RejectedError": ("resilient.errors", "RejectedError"),
    "ResilienceError": ("resilient.errors", "ResilienceError"),
    "subscribe": ("resilient.events", "subscribe"),
    "unsubscribe": ("resilient.events", "unsubscribe"),
    "FeatureDisabledError": ("resilient.manager", "FeatureDisabledError"),
    "ResilienceConfig": ("resilient.manager", "ResilienceConfig"),
    "ResilienceManager": ("resilient.manager", "ResilienceManager"),
    "ServiceExistsError": ("resilient.manager", "ServiceExistsError"),
    "ServiceNotFoundError": ("resilient.manager", "ServiceNotFoundError"),
    "create_resilience_manager": ("resilient.manager", "create_resilience_manager"),
    "PrometheusMetrics": ("resilient.metrics", "PrometheusMetrics"),
    "disable_metrics": ("resilient.metrics", "disable"),
    "enable_metrics": ("resilient.metrics", "enable"),
    "breakers": ("resilient.pipeline", "breakers"),
    "get_breaker": ("resilient.pipeline", "get_breaker"),
    "get_policy": ("resilient.policy", "get_policy"),
    "load_policies": ("resilient.policy", "load_policies"),
    "policy_names": ("resilient.policy", "policy_names"),
    "RateLimiter": ("resilient.ratelimit", "RateLimiter"),
    "get_rate_limiter": ("resilient.ratelimit", "get_rate_limiter"),
    "rate_limiters": ("resilient.ratelimit", "rate_limiters"),
}

_lock = threading.RLock()  # re-entrant: a module being loaded may use a public name
_loaded = False


def _load() -> None:
    """Import every module behind the public names, once (what `import resilient` did)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        for module in dict.fromkeys(module for module, _attr in _EXPORTS.values()):
            importlib.import_module(module)
        _loaded = True


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        if name.startswith("__"):
            raise AttributeError(f"module 'resilient' has no attribute {name!r}")
        try:  # a submodule not imported yet: `import resilient; resilient.metrics`
            return importlib.import_module(f"resilient.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"resilient.{name}":
                raise
            raise AttributeError(f"module 'resilient' has no attribute {name!r}") from None
    _load()
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "HedgeConfig",
    "ChaosConfig",
    "HttpConfig",
    "AdaptiveConfig",
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
    "ChaosError",
    "ChaosRefusedError",
    "ChaosTimeoutError",
    "ServiceNotFoundError",
    "ServiceExistsError",
    "FeatureDisabledError",
    "__version__",
)
