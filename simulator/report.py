"""Progress display, summary table and accuracy plot for ``fedmq demo`` / ``fedmq simulate``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from aggregator.service import Progress


class ProgressBar:
    """One live status line (rewritten in place on a terminal, a line every few seconds otherwise)."""

    def __init__(
        self, duration: float, target: float | None = None, stream: TextIO | None = None, interval: float = 5.0
    ) -> None:
        self.duration = duration
        self.target = target
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        """Render ``p``."""
        now = time.monotonic()
        if not self.tty and now - self._last < self.interval:
            return
        self._last = now
        frac = min(1.0, p.elapsed / self.duration) if self.duration else 0.0
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        acc = f"{p.accuracy:.3f}" if p.accuracy is not None else "  -  "
        eps = f"{p.max_epsilon:.1f}" if p.max_epsilon else "-"
        line = (
            f"[{bar}] {p.elapsed:5.1f}s  v{p.version:<5d} acc {acc}  accepted {p.accepted:<6d} "
            f"rejected {p.rejected:<4d} staleness {p.mean_staleness:4.2f}  eps {eps}  online {p.agents_online}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_summary(s: dict[str, Any]) -> str:
    """A human-readable summary table."""
    acc = s.get("final_accuracy")
    eps = s.get("max_epsilon")
    rows = [
        ("broker", s.get("broker", "-")),
        ("rule", s.get("rule", "-")),
        ("robust aggregation", f"{s.get('robust', 'none')} {s.get('robust_counters') or ''}".strip()),
        ("task", f"{s.get('task', 'digits')} (model {s.get('model', '-')})"),
        ("agents", f"{s.get('agents', '-')} ({s.get('training_examples', '-')} training examples)"),
        ("attack", f"{s.get('attack')} by {s.get('malicious_agents')} agents" if s.get("malicious_agents") else "none"),
        ("final test accuracy", f"{acc:.4f} on {s.get('test_set', 'held-out split')}" if acc is not None else "-"),
        ("time to target", _tta_cell(s)),
        ("model versions", s.get("model_versions")),
        ("updates accepted", s.get("updates_accepted")),
        ("updates rejected", f"{s.get('updates_rejected')} {s.get('rejected_by_reason') or ''}".strip()),
        ("mean staleness", s.get("mean_staleness")),
        ("max epsilon (per agent)", f"{eps:.2f} at delta={s.get('delta')}" if eps is not None else "DP off"),
        *(
            [("federation epsilon", f"{fed:.2f} (the aggregator's ledger of released sums)")]
            if (fed := s.get("federation_epsilon")) is not None
            else []
        ),
        ("wall seconds", s.get("wall_seconds")),
    ]
    if s.get("secure_aggregation"):
        cohorts = f"{s.get('cohorts_applied', 0)} summed, {s.get('cohorts_abandoned', 0)} abandoned"
        rows.insert(2, ("secure aggregation", f"on: the aggregator saw only sums ({cohorts})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _tta_cell(s: dict[str, Any]) -> str:
    target = s.get("task_target_accuracy")
    if target is None:
        return "-"
    t = time_to_accuracy(s, float(target))
    return f"{t:.1f} s to {target:.2f}" if t is not None else f"{target:.2f} not reached"


def time_to_accuracy(summary: dict[str, Any], threshold: float) -> float | None:
    """Wall-clock seconds until test accuracy first reached ``threshold`` (``None``: never)."""
    for elapsed, _version, acc in summary.get("accuracy_history") or []:
        if acc >= threshold:
            return float(elapsed)
    return None


def format_comparison(summaries: dict[str, dict[str, Any]], threshold: float) -> str:
    """One row per run: final accuracy, time to ``threshold``, versions, updates, staleness, epsilon."""
    head = (
        f"  {'rule':<10} {'final acc':>9} {'t->' + format(threshold, '.2f'):>8} {'versions':>8} "
        f"{'accepted':>8} {'rejected':>8} {'staleness':>9} {'max eps':>8}"
    )
    rows = [head, "  " + "-" * (len(head) - 2)]
    for label, s in summaries.items():
        t = time_to_accuracy(s, threshold)
        eps = s.get("max_epsilon")
        t_text = f"{t:.1f}s" if t is not None else "never"
        eps_text = f"{eps:.0f}" if eps is not None else "-"
        rows.append(
            f"  {label:<10} {s.get('final_accuracy') or 0:9.4f} {t_text:>8} "
            f"{s.get('model_versions'):>8} {s.get('updates_accepted'):>8} {s.get('updates_rejected'):>8} "
            f"{s.get('mean_staleness'):>9} {eps_text:>8}"
        )
    return "\n".join(rows)


def plot_accuracy(
    summaries: dict[str, dict[str, Any]], path: str | Path, title: str = "fedmq", target: float | None = None
) -> Path:
    """Write a PNG of test accuracy against wall-clock seconds, one line per run (``target``: a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, s in summaries.items():
        hist = s.get("accuracy_history") or []
        if hist:
            ax.plot([h[0] for h in hist], [h[2] for h in hist], label=label, lw=1.6)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
