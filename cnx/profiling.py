"""What a `torch.profiler` trace of a few training steps says: how long the GPU sat idle, and where time went.

The idle fraction is the share of the traced window in which no kernel, copy or
memset ran on the GPU: launch overhead and host-side work the GPU waited for. On
a CPU there is no such thing to measure; the top operators by their own CPU time
stand in for the top kernels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: overlapping streams count once."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def idle_fraction(intervals: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """The share of [start, end] that no interval covers."""
    inside = [(max(a, start), min(b, end)) for a, b in intervals if b > start and a < end]
    return 1.0 - busy_time(inside) / (end - start)


def top_by_time(items: Iterable[tuple[str, float]], n: int = 10) -> list[tuple[str, float, float]]:
    """(name, summed time, share of all the time) of the `n` names with the most time."""
    totals: dict[str, float] = defaultdict(float)
    for name, duration in items:
        totals[name] += duration
    everything = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:n]
    return [(name, duration, duration / everything) for name, duration in ranked]


@dataclass(frozen=True)
class TraceSummary:
    idle_fraction: float | None  # of the GPU over the traced window; None on a CPU
    top: list[tuple[str, float, float]]  # (kernel or operator, microseconds, share)
    what: str  # "GPU kernels" or "CPU operators (self time)"

    def lines(self) -> list[str]:
        idle = "n/a (CPU)" if self.idle_fraction is None else f"{self.idle_fraction:.1%}"
        rows = [f"GPU idle fraction: {idle}; top {len(self.top)} {self.what}:"]
        rows += [f"  {share:6.1%} {us / 1e3:10.2f} ms  {name[:90]}" for name, us, share in self.top]
        return rows


def summarize(profile, on_gpu: bool, n: int = 10) -> TraceSummary:
    """The summary of a finished `torch.profiler.profile` (times in microseconds)."""
    from torch.autograd import DeviceType

    if not on_gpu:
        ops = ((a.key, a.self_cpu_time_total) for a in profile.key_averages())
        return TraceSummary(None, top_by_time(ops, n), "CPU operators (self time)")
    events = profile.events()
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in device]
    window = (min(e.time_range.start for e in events), max(e.time_range.end for e in events))
    idle = idle_fraction(intervals, *window) if intervals else 1.0
    return TraceSummary(
        idle, top_by_time(((e.name, e.time_range.elapsed_us()) for e in device), n), "GPU kernels"
    )
