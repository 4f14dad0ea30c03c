"""
Human reports of a run: Markdown and HTML, drawn from the journal.

Both are rendered from ``result.to_dict()``, so a journal saved as JSON can be
turned into a report later (``write_report(json.load(f), "report.html")``).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["render_html", "render_markdown", "write_journal", "write_report"]

_VERDICT = {
    "completed": "the steady state held before and after the faults",
    "failed": "the steady state did NOT hold",
    "aborted": "ABORTED by a safety condition (emergency stop)",
    "cancelled": "cancelled before the end (rollbacks ran)",
    "error": "ended by an error (rollbacks ran)",
    "dry_run": "dry run: nothing was injected",
}


def _data(journal: Any) -> Mapping[str, Any]:
    return journal if isinstance(journal, Mapping) else journal.to_dict()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _sections(data: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]] | None]]:
    """The report as (heading, paragraphs or bullet lines, table rows) triples."""
    out: list[tuple[str, list[str], list[list[str]] | None]] = []
    status = str(data["status"])
    summary = [f"**Result: {status}** — {_VERDICT.get(status, status)}."]
    if data.get("abort_reason"):
        summary.append(f"Why: {data['abort_reason']}.")
    if data.get("error"):
        summary.append(f"Error: {data['error']}.")
    if data.get("started_at"):
        summary.append(
            f"Started {data['started_at']}, ran {data['duration']:g} s, "
            f"environment {data.get('environment')!s}."
        )
    totals = data.get("totals") or {}
    if totals:
        summary.append(
            f"{totals.get('calls', 0)} calls, success rate {_fmt(totals.get('success_rate'))}, "
            f"{totals.get('faults', 0)} faults injected, {totals.get('retries', 0)} retries."
        )
    out.append(("Summary", summary, None))
    if data.get("plan"):
        out.append(("Plan", [f"- {line}" for line in data["plan"]], None))
    hyp = data.get("hypothesis") or {}
    for key, heading in (("before", "before the method"), ("after", "after the rollbacks")):
        probes = hyp.get(key)
        if probes is None:
            continue
        rows = [["probe", "measured", "tolerance", "held"]]
        rows += [
            [p["probe"], _fmt(p["value"]), _fmt(p["tolerance"]), "yes" if p["held"] else "NO"]
            for p in probes
        ]
        text = []
        if key == "after" and hyp.get("recovery_time") is not None:
            text.append(f"Recovered {hyp['recovery_time']:g} s after the rollbacks.")
        out.append((f"Steady state {heading}: {hyp.get('title')}", text, rows))
    if data.get("steps"):
        rows = [
            ["step", "service", "modes", "intensity", "from (s)", "to (s)", "faults", "stopped"]
        ]
        rows += [
            [
                s["name"],
                s["service"],
                ", ".join(s["modes"]),
                _fmt(s["intensity"]),
                _fmt(s.get("started")),
                _fmt(s.get("ended")),
                _fmt(s.get("faults")),
                _fmt(s.get("stop_reason")),
            ]
            for s in data["steps"]
        ]
        out.append(("Method", [], rows))
    if data.get("breaker_transitions"):
        rows = [["at (s)", "service", "from", "to"]]
        rows += [
            [_fmt(t["at"]), t["service"], t["old"], t["new"]] for t in data["breaker_transitions"]
        ]
        out.append(("Circuit breaker transitions", [], rows))
    if data.get("rollbacks"):
        lines = []
        for r in data["rollbacks"]:
            what = r["action"] + (f" {r['service']}" if r.get("service") else "")
            what += f" {r['function']}" if r.get("function") else ""
            lines.append(f"- {what}: {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])}")
        out.append(("Rollbacks", lines, None))
    recs = data.get("recommendations") or []
    out.append(("Recommendations", [f"- {r}" for r in recs] or ["(none)"], None))
    if data.get("timeline"):
        rows = [
            ["at (s)", "phase", "intensity", "calls", "faults", "success", "p95 (s)", "breakers"]
        ]
        rows += [
            [
                _fmt(s["at"]),
                s["phase"],
                _fmt(s["intensity"]),
                str(s["calls"]),
                str(s["injected"]),
                _fmt(s["success_rate"]),
                _fmt(s["latency_p95"]),
                ", ".join(f"{k}={v}" for k, v in s["breakers"].items()),
            ]
            for s in data["timeline"]
        ]
        out.append(("Timeline", [], rows))
    return out


def render_markdown(journal: Any, *, plot: str | None = None) -> str:
    """
    The report as Markdown.

    Args:
        journal: An ``ExperimentResult`` or its ``to_dict()``.
        plot: A path of the timeline image to link (relative to the report).
    """
    data = _data(journal)
    parts = [f"# Chaos experiment: {data['title']}", ""]
    if data.get("description"):
        parts += [str(data["description"]).strip(), ""]
    if plot:
        parts += [f"![timeline]({plot})", ""]
    for heading, lines, rows in _sections(data):
        parts += [f"## {heading}", ""]
        if lines:
            parts += [*lines, ""]
        if rows:
            parts.append("| " + " | ".join(rows[0]) + " |")
            parts.append("|" + "---|" * len(rows[0]))
            parts += [
                "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]
            ]
            parts.append("")
    return "\n".join(parts)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;"
    "text-align:left}th{background:#f3f3f3}.NO{color:#b00;font-weight:bold}"
)


def render_html(journal: Any, *, plot: str | None = None) -> str:
    """The report as a standalone HTML page (arguments as :func:`render_markdown`)."""
    data = _data(journal)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Chaos experiment: {esc(str(data['title']))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Chaos experiment: {esc(str(data['title']))}</h1>",
    ]
    if data.get("description"):
        parts.append(f"<p>{esc(str(data['description']).strip())}</p>")
    if plot:
        parts.append(f'<p><img src="{esc(plot)}" alt="timeline of the run" width="100%"></p>')
    for heading, lines, rows in _sections(data):
        parts.append(f"<h2>{esc(heading)}</h2>")
        bullets = [line[2:] for line in lines if line.startswith("- ")]
        for line in lines:
            if not line.startswith("- "):
                parts.append(f"<p>{_inline(line)}</p>")
        if bullets:
            parts.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in bullets) + "</ul>")
        if rows:
            parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>")
            for row in rows[1:]:
                cells = "".join(
                    f'<td class="{c}">{esc(c)}</td>' if c == "NO" else f"<td>{esc(c)}</td>"
                    for c in row
                )
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _inline(text: str) -> str:
    """Escape *text*, turning ``**bold**`` into ``<strong>``."""
    pieces = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces))


def write_report(
    journal: Any, path: str | os.PathLike[str], *, plot: str | os.PathLike[str] | None = None
) -> None:
    """
    Write the report to *path*: HTML for ``.html``/``.htm``, else Markdown.

    Args:
        journal: An ``ExperimentResult`` or its ``to_dict()``.
        path: Where to write.
        plot: The timeline image to show in the report (linked relative to *path*).
    """
    target = Path(path)
    link = None
    if plot is not None:
        link = os.path.relpath(Path(plot).resolve(), target.resolve().parent)
    if target.suffix.lower() in {".html", ".htm"}:
        text = render_html(journal, plot=link)
    else:
        text = render_markdown(journal, plot=link)
    target.write_text(text, encoding="utf-8")


def write_journal(journal: Any, path: str | os.PathLike[str]) -> None:
    """Write the JSON journal of a run to *path*."""
    Path(path).write_text(json.dumps(_data(journal), indent=2) + "\n", encoding="utf-8")
