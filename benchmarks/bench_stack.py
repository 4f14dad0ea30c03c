"""
The whole stack: resilient's full async and sync stacks against the same stacks composed
by hand from the usual libraries, and against hyx, nopanic and pyresilience; what each
stage adds (an ablation table); throughput with 1, 100 and 1,000 concurrent tasks and
with 8 threads.

Usage::

    python benchmarks/bench_stack.py [--quick]

Stacks (outermost first, docs/architecture.md):

* ours, async: total timeout 10 s -> retry (3 attempts) -> circuit breaker -> rate limit
  (1e9/s, never reached) -> bulkhead (100) -> per-attempt timeout 5 s, Prometheus metrics
  on (``resilient.metrics.enable(registry=CollectorRegistry())``).
* hand-composed, async: ``asyncio.timeout(10)`` around ``tenacity.retry`` around
  ``aiobreaker.call_async`` around ``async with aiolimiter.AsyncLimiter`` ->
  ``async with asyncio.Semaphore(100)`` -> ``async with asyncio.timeout(5)``.
* hyx: ``retry`` -> ``consecutive_breaker`` -> ``tokenbucket`` -> ``bulkhead``
  (hyx has no per-call metrics; the issue's comparison leaves its timeout out).
* nopanic: ``timeout(10)`` -> ``retry`` -> ``circuit_breaker`` -> ``rate_limit`` ->
  ``bulkhead`` -> ``timeout(5)``; pyresilience: its ``resilient`` decorator with the same
  sections (reported only).
* ours, sync: retry -> breaker -> bulkhead, metrics on; hand-composed: ``tenacity.retry``
  around ``pybreaker.CircuitBreaker.call`` around ``threading.BoundedSemaphore(100)``.

Per-call figures are *overheads* over the bare call, measured as bench_foundation.py
does (compiled loops, rotated rounds, minimum over rounds). Throughput is calls per second
of N tasks (or threads) sharing one decorated function that yields to the loop once per
call (``await asyncio.sleep(0)``), best of a few runs; the bulkhead limits are 10,000 there
so that 1,000 tasks never queue
(the auto-scaling bulkhead may still lower its own limit: rows with it on and off).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _blocks import Config, Runner, Variant
from _runner import Context, Row, render

import resilient
from resilient import metrics

RETRY = {"max_attempts": 3, "base_delay": 0.01, "retry_on": ["ConnectionError"]}
NO_RETRY_TIMEOUTS = {"timeout": None, "per_attempt_timeout": None}
BREAKER = {"failure_threshold": 5}
RATE = {"max_rate": 1e9, "time_period": 1.0}
BULKHEAD = {"max_concurrent_requests": 100}
TIMEOUTS = {"per_attempt": 5.0, "total": 10.0}
FIXED = {"enable_auto_scaling": False}

# The ablation: each policy adds one stage to the one before (async; sync has no timeouts).
ASYNC_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("retry", {"retry": {**RETRY, **NO_RETRY_TIMEOUTS}}),
    ("+ circuit breaker", {"circuit_breaker": BREAKER}),
    ("+ rate limit", {"rate_limit": RATE}),
    ("+ bulkhead", {"bulkhead": BULKHEAD}),
    ("+ per-attempt timeout", {"timeout": {"per_attempt": 5.0}}),
    ("+ total timeout", {"timeout": TIMEOUTS}),
]
SYNC_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("retry", {"retry": {**RETRY, **NO_RETRY_TIMEOUTS}}),
    ("+ circuit breaker", {"circuit_breaker": BREAKER}),
    ("+ bulkhead", {"bulkhead": BULKHEAD}),
]


def _cumulative(steps: list[tuple[str, dict[str, Any]]], prefix: str) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    policy: dict[str, Any] = {}
    for i, (_label, section) in enumerate(steps):
        policy = {**policy, **section}
        policies[f"{prefix}{i}"] = dict(policy)
    return policies


def policies() -> dict[str, Any]:
    wide = {"bulkhead": {"max_concurrent_requests": 10_000}}
    async_full = _cumulative(ASYNC_STEPS, "a")[f"a{len(ASYNC_STEPS) - 1}"]
    sync_full = _cumulative(SYNC_STEPS, "s")[f"s{len(SYNC_STEPS) - 1}"]
    return {
        "version": 1,
        "policies": {
            **_cumulative(ASYNC_STEPS, "a"),
            **_cumulative(SYNC_STEPS, "s"),
            "async_full": async_full,
            "sync_full": sync_full,
            "async_wide": {**async_full, **wide},  # throughput: 1,000 tasks never queue
            "async_wide_fixed": {**async_full, "bulkhead": {**wide["bulkhead"], **FIXED}},
            "sync_wide": {**sync_full, **wide},
        },
    }


def metrics_on() -> None:
    if metrics.active() is None:
        from prometheus_client import CollectorRegistry

        metrics.enable(registry=CollectorRegistry())


def metrics_off() -> None:
    metrics.disable()


# --------------------------------------------------------------------------- functions


def f() -> int:
    return 1


async def af() -> int:
    return 1


async def io() -> int:
    await asyncio.sleep(0)  # one turn of the loop, as any real I/O
    return 1


def io_sync() -> int:
    return 1


# --------------------------------------------------------------------------- peer stacks


def hand_async(fn: Callable[[], Awaitable[Any]], limit: int) -> Callable[[], Awaitable[Any]] | None:
    """tenacity + aiobreaker + aiolimiter + Semaphore + asyncio.timeout, composed by hand."""
    tenacity, aiobreaker, aiolimiter = (
        Context.peer(n) for n in ("tenacity", "aiobreaker", "aiolimiter")
    )
    if tenacity is None or aiobreaker is None or aiolimiter is None:
        return None
    breaker = aiobreaker.CircuitBreaker(fail_max=5)
    limiter = aiolimiter.AsyncLimiter(1e9, 1.0)
    sem = asyncio.Semaphore(limit)

    async def attempt() -> Any:
        async with limiter, sem, asyncio.timeout(5.0):
            return await fn()

    async def attempts() -> Any:
        return await breaker.call_async(attempt)

    retried = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential(multiplier=0.01),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        reraise=True,
    )(attempts)

    async def stack() -> Any:
        async with asyncio.timeout(10.0):
            return await retried()

    return stack


def hyx_async(fn: Callable[[], Awaitable[Any]], limit: int) -> Callable[[], Awaitable[Any]] | None:
    """hyx's retry + breaker + token bucket + bulkhead."""
    if Context.peer("hyx") is None:
        return None
    from hyx.bulkhead import bulkhead
    from hyx.circuitbreaker import consecutive_breaker
    from hyx.ratelimit import tokenbucket
    from hyx.retry import retry

    @retry(on=ConnectionError, attempts=3, backoff=0.01)
    @consecutive_breaker(exceptions=ConnectionError, failure_threshold=5)
    @tokenbucket(max_executions=1e9, per_time_secs=1.0)
    @bulkhead(max_concurrency=limit, max_capacity=limit)
    async def stack() -> Any:
        return await fn()

    return stack


def nopanic_stack(fn: Callable[[], Any], limit: int, timeouts: bool) -> Callable[[], Any] | None:
    """nopanic's full stack (timeouts only for async functions)."""
    np = Context.peer("nopanic")
    if np is None:
        return None
    layers: list[Callable[[Any], Any]] = []
    if timeouts:
        layers.append(np.timeout(10.0))
    layers += [
        np.retry(attempts=3, on=ConnectionError, backoff=0.01),
        np.circuit_breaker(),
    ]
    if timeouts:
        layers.append(np.rate_limit(1e9))
    layers.append(np.bulkhead(limit))
    if timeouts:
        layers.append(np.timeout(5.0))
    for layer in reversed(layers):
        fn = layer(fn)
    return fn


def pyresilience_stack(
    fn: Callable[[], Any], limit: int, timeouts: bool
) -> Callable[[], Any] | None:
    """pyresilience's ``resilient`` decorator with the same sections (reported only)."""
    pr = Context.peer("pyresilience")
    if pr is None:
        return None
    kw: dict[str, Any] = {
        "retry": pr.RetryConfig(max_attempts=3, delay=0.01, retry_on=(ConnectionError,)),
        "circuit_breaker": pr.CircuitBreakerConfig(failure_threshold=5),
        "bulkhead": pr.BulkheadConfig(max_concurrent=limit),
    }
    if timeouts:
        kw["timeout"] = pr.TimeoutConfig(seconds=5.0)
        kw["rate_limiter"] = pr.RateLimiterConfig(max_calls=10**9, period=1.0)
    return pr.resilient(**kw)(fn)  # type: ignore[no-any-return]


def hand_sync(fn: Callable[[], Any], limit: int) -> Callable[[], Any] | None:
    """tenacity + pybreaker + threading.BoundedSemaphore, composed by hand."""
    tenacity, pybreaker = Context.peer("tenacity"), Context.peer("pybreaker")
    if tenacity is None or pybreaker is None:
        return None
    breaker = pybreaker.CircuitBreaker(fail_max=5)
    sem = threading.BoundedSemaphore(limit)

    def guarded() -> Any:
        with sem:
            return fn()

    def call() -> Any:
        return breaker.call(guarded)

    stack: Callable[[], Any] = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential(multiplier=0.01),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        reraise=True,
    )(call)

    return stack


# --------------------------------------------------------------------------- per call


def per_call_rows(ctx: Context) -> list[Row]:
    cfg = ctx.pick(
        Config(block_ms=20, rounds=15, thread_runs=0, rejections=0),
        Config(block_ms=5, rounds=5, thread_runs=0, rejections=0),
        Config(block_ms=1, rounds=1, thread_runs=0, rejections=0),
    )
    res = resilient.resilient
    ns: dict[str, Any] = {"f": f, "af": af}
    for i in range(len(ASYNC_STEPS)):
        ns[f"abl_a{i}"] = res(f"a{i}")(af)
    for i in range(len(SYNC_STEPS)):
        ns[f"abl_s{i}"] = res(f"s{i}")(f)
    ns["ours_async"] = res("async_full")(af)
    ns["ours_sync"] = res("sync_full")(f)
    runner = Runner(cfg, ns)
    V = Variant
    rows: list[Row] = []
    unit = "ns/call overhead"

    def over(key: str, bare: str) -> float:
        return runner.results[key].best - runner.results[bare].best

    async def prepare() -> dict[str, Any]:
        return {
            "hand_async": hand_async(af, 100),
            "hyx_async": hyx_async(af, 100),
            "np_async": nopanic_stack(af, 100, timeouts=True),
            "pr_async": pyresilience_stack(af, 100, timeouts=True),
        }

    if ctx.wants("full async stack"):
        hand = "hand-composed (tenacity+aiobreaker+aiolimiter+Semaphore+timeout)"
        peers = [("hand_async", hand, 0.08),
                 ("hyx_async", "hyx retry+breaker+tokenbucket+bulkhead", 0.3),
                 ("np_async", "nopanic full stack", 0.3),
                 ("pr_async", "pyresilience resilient(...)", None)]  # fmt: skip
        variants = [
            V("a_bare", "bare", "await af()"),
            V("ours_async", "ours", "await ours_async()", setup=metrics_on),
        ]
        # Peers are built in the group's loop (prepare); a missing one has no variant.
        built = asyncio.run(prepare())
        for key, _label, _limit in peers:
            if built[key] is not None:
                variants.append(V(key, key, f"await {key}()"))
        runner.group_async(variants, prepare)
        ours = over("ours_async", "a_bare")
        for key, label, limit in peers:
            if built[key] is None:
                rows.append(Row.missing("full async stack, metrics on", label.split()[0]))
            else:
                rows.append(Row("full async stack, metrics on", ours, unit, label,
                                over(key, "a_bare"), max_ratio=limit))  # fmt: skip

    if ctx.wants("full sync stack"):
        ns["hand_sync"] = hand_sync(f, 100)
        ns["np_sync"] = nopanic_stack(f, 100, timeouts=False)
        ns["pr_sync"] = pyresilience_stack(f, 100, timeouts=False)
        peers = [("hand_sync", "tenacity+pybreaker+BoundedSemaphore", 0.05),
                 ("np_sync", "nopanic retry+breaker+bulkhead", None),
                 ("pr_sync", "pyresilience resilient(...)", None)]  # fmt: skip
        variants = [
            V("s_bare", "bare", "f()"),
            V("ours_sync", "ours", "ours_sync()", setup=metrics_on),
        ]
        variants += [V(key, key, f"{key}()") for key, _l, _t in peers if ns[key] is not None]
        runner.group_sync(variants)
        ours = over("ours_sync", "s_bare")
        for key, label, limit in peers:
            if ns[key] is None:
                rows.append(Row.missing("full sync stack, metrics on", label.split("+")[0]))
            else:
                rows.append(Row("full sync stack, metrics on", ours, unit, label,
                                over(key, "s_bare"), max_ratio=limit))  # fmt: skip

    if ctx.wants("ablation"):
        rows += _ablation(runner, "async", ASYNC_STEPS, "abl_a", "await af()", "await {}()")
        rows += _ablation(runner, "sync", SYNC_STEPS, "abl_s", "f()", "{}()")
    metrics_off()
    return rows


def _ablation(
    runner: Runner, mode: str, steps: list[tuple[str, dict[str, Any]]], prefix: str,
    bare: str, call: str,
) -> list[Row]:  # fmt: skip
    V = Variant
    variants = [V(f"{prefix}_bare", "bare", bare, setup=metrics_off)]
    for i, (label, _section) in enumerate(steps):
        variants.append(V(f"{prefix}{i}", label, call.format(f"{prefix}{i}"), setup=metrics_off))
    last = f"{prefix}{len(steps) - 1}"
    variants.append(V(f"{prefix}_metrics", "+ metrics", call.format(last), setup=metrics_on))
    if mode == "async":
        runner.group_async(variants)
    else:
        runner.group_sync(variants)
    rows = []
    before = runner.results[f"{prefix}_bare"].best
    for v in variants[1:]:
        best = runner.results[v.key].best
        total = best - runner.results[f"{prefix}_bare"].best
        rows.append(Row(f"ablation, {mode}: {v.label}", best - before, "ns/call added",
                        note=f"stack total {total:,.0f} ns"))  # fmt: skip
        before = best
    return rows


# --------------------------------------------------------------------------- throughput


async def _async_rate(fn: Callable[[], Awaitable[Any]], tasks: int, total: int, runs: int) -> float:
    per = max(total // tasks, 1)

    async def worker() -> None:
        for _ in range(per):
            await fn()

    best = 0.0
    for _ in range(runs):
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        best = max(best, per * tasks / (time.perf_counter() - began))
    return best


def _thread_rate(fn: Callable[[], Any], threads: int, total: int, runs: int) -> float:
    per = max(total // threads, 1)
    best = 0.0
    for _ in range(runs):
        barrier = threading.Barrier(threads + 1)

        def worker(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            for _ in range(per):
                fn()

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        barrier.wait()
        began = time.perf_counter()
        for t in pool:
            t.join()
        best = max(best, per * threads / (time.perf_counter() - began))
    return best


def throughput_rows(ctx: Context) -> list[Row]:
    total = ctx.pick(100_000, 20_000, 2_000)
    runs = ctx.pick(3, 2, 1)
    rows: list[Row] = []
    metrics_on()
    if ctx.wants("throughput, full async stack"):

        async def measure() -> None:
            ours = {
                "": resilient.resilient("async_wide")(io),
                " (bulkhead auto-scaling off)": resilient.resilient("async_wide_fixed")(io),
            }
            peers = {"hand-composed": hand_async(io, 10_000), "hyx": hyx_async(io, 10_000)}
            for fn in ours.values():
                await _async_rate(fn, 10, 1000, 1)  # warm-up, pipeline build
            for tasks in (1, 100, 1000):
                theirs = {
                    name: None if stack is None else await _async_rate(stack, tasks, total, runs)
                    for name, stack in peers.items()
                }
                for label, fn in ours.items():
                    case = f"throughput, full async stack{label}, {tasks} tasks"
                    mine = await _async_rate(fn, tasks, total, runs)
                    for name, rate in theirs.items():
                        if rate is None:
                            rows.append(Row.missing(case, name))
                        else:
                            rows.append(
                                Row(case, mine, "calls/s", name, rate, note="higher is better")
                            )

        asyncio.run(measure())
    if ctx.wants("throughput, full sync stack"):
        ours_sync = resilient.resilient("sync_wide")(io_sync)
        hand = hand_sync(io_sync, 10_000)
        ours_sync()
        for threads in (1, 8):
            case = f"throughput, full sync stack, {threads} threads"
            mine = _thread_rate(ours_sync, threads, total, runs)
            if hand is None:
                rows.append(Row.missing(case, "tenacity or pybreaker"))
            else:
                theirs = _thread_rate(hand, threads, total, runs)
                rows.append(Row(case, mine, "calls/s", "tenacity+pybreaker+BoundedSemaphore",
                                theirs, note="higher is better"))  # fmt: skip
    metrics_off()
    return rows


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    resilient.load_policies(policies())
    return per_call_rows(ctx) + throughput_rows(ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("-k", help="only the cases whose name contains this")
    args = parser.parse_args(argv)
    ctx = Context(scale="quick" if args.quick else "full", k=args.k, module="bench_stack")
    print(render(run_benchmark(ctx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
