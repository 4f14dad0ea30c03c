"""
The adaptive breaker's costs, side by side with the basic breaker in one run.

    python benchmarks/adaptive/perf.py [--quick]

1. Success-path cost: ``@resilient`` breaker-only functions (sync and async),
   basic vs adaptive (shadow, with a model predicting once per bucket), measured
   round by round in a rotated order with compiled loops (benchmarks/_blocks.py);
   the minimum over rounds is kept and the ratio printed (target <= 1.1x).
2. Event-loop lag while the model retrains under load: an asyncio server-like
   load (tasks calling an adaptive-breaker function in a loop) while the
   breaker retrains its forest in its background thread on a large history;
   a ticker measures how late ``asyncio.sleep(0.005)`` wakes up; the p99 of the
   lateness is printed, next to the same load without training (target <= 10 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import resilient
from benchmarks._blocks import Config, Runner, Variant
from resilient.adaptive import AdaptiveCircuitBreaker, train
from resilient.pipeline import get_breaker


def f() -> int:
    return 1


async def af() -> int:
    return 1


def success_path(cfg: Config, model_path: str) -> list[tuple[str, float, float]]:
    resilient.load_policies(
        {
            "policies": {
                "basic": {"circuit_breaker": {}},
                "adaptive": {
                    "circuit_breaker": {
                        "type": "adaptive",
                        "adaptive": {
                            "model_path": model_path,
                            "min_samples": 10,
                            "bucket_seconds": 0.05,
                        },
                    }
                },
                "throttle": {
                    "circuit_breaker": {
                        "type": "adaptive",
                        "enable_ml_prediction": False,
                        "adaptive": {"mode": "throttle"},
                    }
                },
            }
        }
    )
    ns: dict[str, Any] = {
        "b_f": resilient.resilient(policy="basic")(f),
        "a_f": resilient.resilient(policy="adaptive")(f),
        "t_f": resilient.resilient(policy="throttle")(f),
        "b_af": resilient.resilient(policy="basic")(af),
        "a_af": resilient.resilient(policy="adaptive")(af),
        "t_af": resilient.resilient(policy="throttle")(af),
    }
    ns["a_f"]()  # builds the breaker, which loads its model in a background thread
    loaded = get_breaker("adaptive")
    assert isinstance(loaded, AdaptiveCircuitBreaker)
    assert loaded.wait_for_model(60), loaded.get_status()["adaptive"]
    runner = Runner(cfg, ns)
    V = Variant
    runner.group_sync(
        [
            V("s_basic", "sync, basic breaker", "b_f()"),
            V("s_adaptive", "sync, adaptive (shadow, predicting)", "a_f()"),
            V("s_throttle", "sync, SRE throttle", "t_f()"),
        ]
    )
    runner.group_async(
        [
            V("a_basic", "async, basic breaker", "await b_af()"),
            V("a_adaptive", "async, adaptive (shadow, predicting)", "await a_af()"),
            V("a_throttle", "async, SRE throttle", "await t_af()"),
        ]
    )
    adaptive = get_breaker("adaptive")
    assert isinstance(adaptive, AdaptiveCircuitBreaker)
    status = adaptive.get_status()["adaptive"]
    assert status["predictions"] > 0, status
    r = runner.results
    rows = []
    for prefix in ("s", "a"):
        base = r[f"{prefix}_basic"].best
        for kind in ("basic", "adaptive", "throttle"):
            v = r[f"{prefix}_{kind}"]
            rows.append((v.label, v.best, v.best / base))
    return rows


async def _lag(seconds: float, train_rows: int, n_estimators: int) -> dict[str, float]:
    resilient.load_policies(
        {
            "policies": {
                "svc": {
                    "circuit_breaker": {
                        "type": "adaptive",
                        "adaptive": {
                            "bucket_seconds": 0.05,
                            "min_samples": 50,
                            "retrain_seconds": 3600,
                            "n_estimators": n_estimators,
                        },
                    }
                }
            }
        }
    )

    @resilient.resilient(policy="svc")
    async def call() -> int:
        await asyncio.sleep(0)
        return 1

    await call()
    breaker = get_breaker("svc")
    assert isinstance(breaker, AdaptiveCircuitBreaker)
    stop = False
    calls = 0

    async def worker() -> None:
        nonlocal calls
        while not stop:
            await call()
            calls += 1

    lateness: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop:
            t0 = loop.time()
            await asyncio.sleep(0.005)
            lateness.append(max(loop.time() - t0 - 0.005, 0.0))

    # a large history to train on, as after hours of buckets
    import random

    rng = random.Random(0)
    rows = [tuple(rng.uniform(-1, 3) for _ in range(12)) for _ in range(train_rows)]
    labels = [int(r[0] > 1.5) for r in rows]
    trainings = 0

    def trainer() -> None:
        nonlocal trainings
        while not stop:
            breaker._model = train(rows, labels, n_estimators=n_estimators)
            trainings += 1

    workers = [asyncio.create_task(worker()) for _ in range(20)]
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(seconds)
    quiet = sorted(lateness)
    lateness.clear()
    # the same load, now with the breaker's training running in a background thread
    thread = threading.Thread(target=trainer, name="resilient-adaptive-svc", daemon=True)
    thread.start()
    calls = 0
    await asyncio.sleep(seconds)
    stop = True
    busy = sorted(lateness)
    await asyncio.gather(*workers, tick)
    thread.join()

    def p(ordered: list[float], q: float) -> float:
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000

    return {
        "p50_quiet_ms": p(quiet, 0.5),
        "p99_quiet_ms": p(quiet, 0.99),
        "p50_training_ms": p(busy, 0.5),
        "p99_training_ms": p(busy, 0.99),
        "max_training_ms": busy[-1] * 1000,
        "trainings": trainings,
        "calls_per_s_training": calls / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg = Config(
        block_ms=20 if args.quick else 50,
        rounds=5 if args.quick else 15,
        thread_runs=1,
        rejections=0,
    )
    import random

    rng = random.Random(1)
    rows = [tuple(rng.uniform(-1, 3) for _ in range(12)) for _ in range(2000)]
    model = train(rows, [int(r[0] > 1) for r in rows], n_estimators=30)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "m.joblib")
        from resilient.adaptive import save_model

        save_model(model, path)
        rows_out = success_path(cfg, path)
    print("## Success path, @resilient breaker-only (ns per call, best of rounds)\n")
    print("| variant | ns/call | vs basic |")
    print("|---|---:|---:|")
    for label, ns, ratio in rows_out:
        print(f"| {label} | {ns:.0f} | {ratio:.2f}x |")
    lag = asyncio.run(_lag(2.0 if args.quick else 5.0, 20_000, 30))
    print("\n## Event-loop lag, 20 tasks calling through the breaker, 5 ms ticker\n")
    print("| | p50 | p99 |")
    print("|---|---:|---:|")
    print(f"| no training | {lag['p50_quiet_ms']:.2f} ms | {lag['p99_quiet_ms']:.2f} ms |")
    print(
        f"| retraining in the background (30 trees on 20,000 buckets, "
        f"{lag['trainings']} fit(s) done) | {lag['p50_training_ms']:.2f} ms | "
        f"{lag['p99_training_ms']:.2f} ms |"
    )
    print(
        f"\nmax lateness while training: {lag['max_training_ms']:.2f} ms; "
        f"{lag['calls_per_s_training']:.0f} calls/s meanwhile"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
