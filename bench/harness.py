"""Interleaved A/B timing: the one way every benchmark here measures.

On a shared 2-core machine a sequential run (all of A, then all of B) measures whatever
else ran meanwhile, not the code. Here contenders take turns: round r times every
contender ``calls`` times, starting at contender ``r mod n`` so no one is always first
after a pause. Warm-up calls (the same order, untimed) are dropped. Each contender's
figure is the min and the median of its timed calls; each comparison is the ratio of the
reference's round median to the contender's, per round, so a load burst that hits one
round hits both sides of that round's ratio.

A run is flagged (``Comparison.flags``) when the per-round ratios spread more than
``max_spread`` around their median, or the load average rose above the core count + 1: the
numbers are kept and printed, but callers refuse flagged runs with ``--strict``.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Dict, List, Optional


@dataclasses.dataclass
class ContenderTimes:
    """Timed calls of one contender, in ms, grouped by round."""

    name: str
    rounds: List[List[float]]

    @property
    def all_ms(self) -> List[float]:
        return [t for r in self.rounds for t in r]

    @property
    def min_ms(self) -> float:
        return min(self.all_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.all_ms)

    @property
    def round_medians(self) -> List[float]:
        return [statistics.median(r) for r in self.rounds]

    def to_dict(self) -> dict:
        return {'min_ms': self.min_ms, 'median_ms': self.median_ms,
                'max_ms': max(self.all_ms), 'n': len(self.all_ms),
                'round_medians_ms': self.round_medians}


@dataclasses.dataclass
class Comparison:
    """The result of one interleaved run."""

    reference: str
    contenders: Dict[str, ContenderTimes]
    load_before: tuple
    load_after: tuple
    load_max: float
    max_spread: float
    flags: List[str]

    def speedup(self, name: str) -> dict:
        """Reference time / contender time: per round (median of them) and by minimum."""
        ref, other = self.contenders[self.reference], self.contenders[name]
        per_round = [a / b for a, b in zip(ref.round_medians, other.round_medians)]
        return {'median_of_rounds': statistics.median(per_round),
                'by_min': ref.min_ms / other.min_ms, 'per_round': per_round,
                'spread': _spread(per_round)}

    @property
    def ok(self) -> bool:
        return not self.flags

    def to_dict(self) -> dict:
        return {'method': 'interleaved', 'rounds': len(self.contenders[self.reference].rounds),
                'reference': self.reference,
                'contenders': {k: v.to_dict() for k, v in self.contenders.items()},
                'speedup_vs_reference': {k: self.speedup(k) for k in self.contenders
                                         if k != self.reference},
                'load_average': {'before': list(self.load_before),
                                 'after': list(self.load_after), 'max_1min': self.load_max},
                'max_spread': self.max_spread, 'flags': list(self.flags), 'ok': self.ok}

    def table(self) -> str:
        lines = [f'{"contender":<28} {"min ms":>10} {"median ms":>10} {"speedup":>9}'
                 f' {"spread":>7}']
        for name, c in self.contenders.items():
            if name == self.reference:
                sp = '(ref)'
                spread = ''
            else:
                s = self.speedup(name)
                sp, spread = f'{s["median_of_rounds"]:.2f}x', f'{100 * s["spread"]:.0f}%'
            lines.append(f'{name:<28} {c.min_ms:>10.2f} {c.median_ms:>10.2f} {sp:>9}'
                         f' {spread:>7}')
        la = ', '.join(f'{x:.2f}' for x in self.load_before)
        lines.append(f'load average before: {la}; max 1-min during: {self.load_max:.2f}')
        for f in self.flags:
            lines.append(f'FLAG: {f}')
        return '\n'.join(lines)


def _spread(values: List[float]) -> float:
    """(max - min) / median: how much the rounds disagree."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else float('inf')


def interleaved(contenders: Dict[str, Callable[[], object]], *, reference: Optional[str] = None,
                rounds: int = 5, calls: int = 3, warmup: int = 1, max_spread: float = 0.25,
                max_load: Optional[float] = None,
                clock: Callable[[], float] = time.perf_counter) -> Comparison:
    """Time ``contenders`` (name -> zero-argument callable) A B A B ... and compare.

    reference: the contender the others are compared with (default: the first).
    rounds >= 5 (fewer cannot tell a load burst from the code). max_load: flag the run
    when the 1-minute load average exceeded it (default: CPUs + 1: the benchmark's own
    threads keep the load near the CPU count, one more runnable task is other work).
    """
    if rounds < 5:
        raise ValueError(f'interleaved runs need >= 5 rounds, got {rounds}')
    if len(contenders) < 2:
        raise ValueError('an interleaved comparison needs at least two contenders')
    names = list(contenders)
    reference = reference or names[0]
    if reference not in contenders:
        raise ValueError(f'reference {reference!r} is not a contender ({", ".join(names)})')
    max_load = float(max_load if max_load is not None else (os.cpu_count() or 1) + 1)
    load_before = os.getloadavg()
    load_max = load_before[0]

    def order(r: int) -> List[str]:
        k = r % len(names)
        return names[k:] + names[:k]

    for r in range(warmup):
        for name in order(r):
            contenders[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in order(r):
            fn, got = contenders[name], []
            for _ in range(calls):
                t = clock()
                fn()
                got.append((clock() - t) * 1e3)
            times[name].append(got)
        load_max = max(load_max, os.getloadavg()[0])
    result = Comparison(reference=reference,
                        contenders={n: ContenderTimes(n, times[n]) for n in names},
                        load_before=load_before, load_after=os.getloadavg(),
                        load_max=load_max, max_spread=max_spread, flags=[])
    for name in names:
        if name == reference:
            continue
        spread = result.speedup(name)['spread']
        if spread > max_spread:
            result.flags.append(f'{name}: per-round speedups spread {100 * spread:.0f}% '
                                f'(> {100 * max_spread:.0f}%); the machine was not steady')
    if load_max > max_load:
        result.flags.append(f'1-minute load average reached {load_max:.2f} (> {max_load:g}): '
                            'other work shared the cores')
    return result


def plot_comparisons(groups: Dict[str, Comparison], path: str, title: str,
                     ylabel: str = 'ms per call (bar: median, dot: min)') -> str:
    """One cluster of bars per comparison: median as the bar, min as a dot."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups)), 4))
    names = []
    for comp in groups.values():
        for n in comp.contenders:
            if n not in names:
                names.append(n)
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        med = [g.contenders[name].median_ms if name in g.contenders else np.nan
               for g in groups.values()]
        mn = [g.contenders[name].min_ms if name in g.contenders else np.nan
              for g in groups.values()]
        pos = x + (i - (len(names) - 1) / 2) * width
        ax.bar(pos, med, width, label=name)
        ax.plot(pos, mn, 'k.', markersize=4)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
