"""The interleaved benchmark harness: order, rounds, ratios and flags (bench/harness.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'bench'))
import harness  # noqa: E402


class FakeWork:
    """Contenders whose calls advance a fake clock by a set cost and log the call order."""

    def __init__(self, costs, slow_rounds=()):
        self.now, self.calls, self.costs, self.slow_rounds = 0.0, [], costs, slow_rounds

    def clock(self):
        return self.now

    def contender(self, name):
        def run():
            self.calls.append(name)
            # a "load burst" makes whole calls slower for chosen call indices
            scale = 3.0 if len(self.calls) in self.slow_rounds else 1.0
            self.now += self.costs[name] * scale
        return run


def run(work, **kw):
    return harness.interleaved({n: work.contender(n) for n in work.costs},
                               clock=work.clock, max_load=1e9, **kw)


def test_contenders_take_turns_with_rotating_start_and_warmup_dropped():
    work = FakeWork({'a': 0.010, 'b': 0.005, 'c': 0.001})
    comp = run(work, rounds=5, calls=2, warmup=1)
    # warm-up: a b c; round 0: a a b b c c; round 1 starts at b; round 2 at c ...
    assert work.calls[:3] == ['a', 'b', 'c']
    assert work.calls[3:9] == ['a', 'a', 'b', 'b', 'c', 'c']
    assert work.calls[9:15] == ['b', 'b', 'c', 'c', 'a', 'a']
    assert work.calls[15:21] == ['c', 'c', 'a', 'a', 'b', 'b']
    assert len(work.calls) == 3 + 5 * 3 * 2
    assert comp.contenders['a'].median_ms == pytest.approx(10.0)
    assert comp.contenders['b'].min_ms == pytest.approx(5.0)
    assert comp.speedup('b')['median_of_rounds'] == pytest.approx(2.0)
    assert comp.speedup('c')['by_min'] == pytest.approx(10.0)
    assert comp.ok and comp.to_dict()['ok']


def test_a_load_burst_in_one_round_is_flagged_not_hidden():
    # calls 5-6 are contender b's calls in round 0 (after warm-up a, b and a, a)
    work = FakeWork({'a': 0.010, 'b': 0.005}, slow_rounds=(5, 6))
    comp = run(work, rounds=5, calls=2, warmup=1)
    assert not comp.ok
    assert 'spread' in comp.flags[0]
    # the median of per-round ratios still reports the steady rounds' answer
    assert comp.speedup('b')['median_of_rounds'] == pytest.approx(2.0)


def test_load_average_above_the_limit_flags_the_run():
    work = FakeWork({'a': 0.002, 'b': 0.001})
    comp = harness.interleaved({n: work.contender(n) for n in work.costs},
                               clock=work.clock, max_load=-1.0)
    assert any('load average' in f for f in comp.flags)


def test_fewer_than_five_rounds_or_one_contender_is_refused():
    work = FakeWork({'a': 0.001, 'b': 0.001})
    with pytest.raises(ValueError, match='5 rounds'):
        run(work, rounds=4)
    with pytest.raises(ValueError, match='two contenders'):
        harness.interleaved({'a': work.contender('a')})
    with pytest.raises(ValueError, match='reference'):
        run(work, reference='z')
