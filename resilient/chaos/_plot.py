"""
Timeline plot of a chaos experiment (matplotlib from the ``plot`` extra, imported here only).

Four rows sharing the time axis: injected faults per interval (bars) with the
injection intensity, the success rate, the latency (p50 and p95), and the state
of each breaker the experiment watched. The phases (baseline, method, rollback,
recovery) are shaded, so the eye finds when the faults began and ended.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from resilient.testing._plot import _STATE_LEVEL  # one scale of breaker states for every plot

__all__ = ["write_plot"]

_PHASE_COLOURS = {
    "method": "tab:red",
    "pause": "tab:orange",
    "rollback": "tab:purple",
    "recovery": "tab:green",
}
MISSING = "the timeline plot needs matplotlib: pip install 'resilient-policies[plot]'"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MISSING) from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def write_plot(journal: Any, path: str | os.PathLike[str]) -> None:
    """
    Write the timeline of a run to *path* (PNG, or any format matplotlib infers
    from the suffix).

    Args:
        journal: An :class:`ExperimentResult`, or its ``to_dict()`` (a saved journal).
        path: Where to write.

    Raises:
        ImportError: matplotlib is missing (the message names the ``plot`` extra).
    """
    data: Mapping[str, Any] = journal if isinstance(journal, Mapping) else journal.to_dict()
    plt = _pyplot()
    timeline = data["timeline"]
    at = [s["at"] for s in timeline]
    breakers = sorted({name for s in timeline for name in s["breakers"]})
    rows = 4 if breakers else 3
    fig, axes = plt.subplots(
        rows,
        1,
        sharex=True,
        figsize=(10, 8 if breakers else 6.5),
        gridspec_kw={"height_ratios": [2, 2, 2, 1.2][:rows]},
        squeeze=False,
    )
    ax = [row[0] for row in axes]
    widths = [b - a for a, b in zip([0.0, *at[:-1]], at, strict=True)]
    ax[0].bar(
        at,
        [s["injected"] for s in timeline],
        width=[-w for w in widths],
        align="edge",
        color="tab:red",
        alpha=0.6,
        label="faults injected",
    )
    ax[0].set_ylabel("faults / interval")
    twin = ax[0].twinx()
    twin.step(at, [s["intensity"] for s in timeline], where="pre", color="black", label="intensity")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("intensity")
    ax[0].legend(loc="upper left", fontsize="small")
    twin.legend(loc="upper right", fontsize="small")

    rates = [s["success_rate"] for s in timeline]
    ax[1].step(
        at, [r if r is not None else float("nan") for r in rates], where="pre", color="tab:green"
    )
    ax[1].set_ylim(-0.05, 1.05)
    ax[1].set_ylabel("success rate")

    for key, colour, label in (
        ("latency_p50", "tab:blue", "p50"),
        ("latency_p95", "tab:orange", "p95"),
    ):
        values = [s[key] if s[key] is not None else float("nan") for s in timeline]
        ax[2].step(at, values, where="pre", color=colour, label=label)
    ax[2].set_ylabel("latency (s)")
    ax[2].legend(loc="upper right", fontsize="small")

    if breakers:
        for name in breakers:
            levels = [_STATE_LEVEL.get(s["breakers"].get(name, "closed"), 0) for s in timeline]
            ax[3].step(at, levels, where="pre", label=name)
        ax[3].set_yticks([0, 1, 2], ["closed", "half-open", "open"])
        ax[3].set_ylim(-0.3, 2.3)
        ax[3].set_ylabel("breaker")
        if len(breakers) > 1:
            ax[3].legend(loc="upper right", fontsize="small")

    _shade_phases(ax, timeline)
    ax[-1].set_xlabel("seconds since the start of the run")
    verdict = data.get("status", "")
    ax[0].set_title(f"{data.get('title', 'chaos experiment')} ({verdict})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _shade_phases(ax: list[Any], timeline: list[Mapping[str, Any]]) -> None:
    """Shade each run of samples of one phase (its interval ends at the sample's time)."""
    start = 0.0
    labelled: set[str] = set()
    for i, sample in enumerate(timeline):
        phase = sample["phase"]
        last = i + 1 == len(timeline) or timeline[i + 1]["phase"] != phase
        if not last:
            continue
        colour = _PHASE_COLOURS.get(phase)
        if colour is not None:
            for axis in ax:
                axis.axvspan(
                    start,
                    sample["at"],
                    color=colour,
                    alpha=0.08,
                    label=phase if axis is ax[1] and phase not in labelled else None,
                )
            labelled.add(phase)
        start = sample["at"]
    if labelled:
        ax[1].legend(loc="lower left", fontsize="small")
