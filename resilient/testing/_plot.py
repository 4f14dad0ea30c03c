"""Timeline plot of a simulation (matplotlib, imported here only)."""

from __future__ import annotations

import os

from resilient.testing._simulate import SimulationResult

__all__ = ["plot_timeline"]

_STATE_LEVEL = {"closed": 0, "half-open": 1, "open": 2}


def plot_timeline(result: SimulationResult, path: str | os.PathLike[str]) -> None:
    """
    Write a PNG (or any format matplotlib infers from *path*): outcomes and
    backend calls per second on top, the breaker state underneath.

    The stacked areas are what the pipeline did with each call (succeeded,
    failed, rejected); calls that the policy's fallback answered are a dashed
    line over them, so a fallback never hides rejections.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    seconds = [s.second for s in result.timeline]
    series = [
        ("succeeded", [s.succeeded for s in result.timeline], "tab:green"),
        ("failed", [s.failed for s in result.timeline], "tab:red"),
        ("rejected", [s.rejected for s in result.timeline], "tab:gray"),
    ]
    has_breaker = any(s.breaker_state is not None for s in result.timeline)
    rows = 2 if has_breaker else 1
    fig, axes = plt.subplots(
        rows,
        1,
        sharex=True,
        figsize=(10, 5 if has_breaker else 3.8),
        gridspec_kw={"height_ratios": [3, 1]} if has_breaker else None,
        squeeze=False,
    )
    top = axes[0][0]
    top.stackplot(
        seconds,
        *[values for _, values, _ in series],
        labels=[label for label, _, _ in series],
        colors=[color for _, _, color in series],
        step="post",
        alpha=0.8,
    )
    top.step(
        seconds,
        [s.backend_calls for s in result.timeline],
        where="post",
        color="black",
        linewidth=1.0,
        label="backend calls",
    )
    if result.fallback:
        top.step(
            seconds,
            [s.fallback for s in result.timeline],
            where="post",
            color="tab:olive",
            linestyle="--",
            linewidth=1.5,
            label="answered by fallback",
        )
    top.set_ylabel("calls per second")
    top.set_title(
        f"policy {result.policy!r} vs {result.scenario!r} ({result.rate:g}/s, seed {result.seed})"
    )
    top.legend(loc="upper right", fontsize="small")
    if has_breaker:
        bottom = axes[1][0]
        levels = [_STATE_LEVEL.get(s.breaker_state or "closed", 0) for s in result.timeline]
        bottom.step(seconds, levels, where="post", color="tab:blue")
        bottom.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
        bottom.set_ylim(-0.3, 2.3)
        bottom.set_ylabel("breaker")
    axes[-1][0].set_xlabel("virtual time (s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
