"""The thread governor against a simulated machine: a clock the "kernel" advances by what
a call costs at the thread count the governor applied (so no timing is measured here)."""

from __future__ import annotations

import random

import pytest

from opswitch.backends.thread_governor import PROBE_MAX_S, ThreadGovernor


class Machine:
    """cost[n]: seconds one call takes with n threads; changed mid-test to make the machine busy."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost, self.now, self.threads, self.applied = dict(cost), 0.0, None, []

    def clock(self) -> float:
        return self.now

    def apply(self, n: int) -> None:
        self.threads = n
        self.applied.append(n)

    def kernel(self) -> None:
        self.now += self.cost[self.threads]


def run(gov: ThreadGovernor, machine: Machine, seconds: float, key: str = "gemv") -> int:
    """Calls until ``seconds`` of simulated time pass; returns how many ran."""
    calls, end = 0, machine.now + seconds
    while machine.now < end:
        gov.run(key, machine.kernel)
        calls += 1
    return calls


def test_a_busy_machine_gets_one_thread_and_keeps_the_one_thread_rate():
    # 2 threads stalled 8x by a descheduled worker (the measured fall), 1 thread unharmed
    machine = Machine({1: 1e-2, 2: 8e-2})
    gov = ThreadGovernor(2, machine.apply, machine.clock)
    calls = run(gov, machine, 60.0)
    assert gov.choice == 1
    # the 1-thread rate is 100 calls/s; each probe of 2 threads loses 70 ms, and after the
    # first few (20 ms apart, doubling) they come PROBE_MAX_S apart: under 5 % in all
    assert calls >= 0.95 * 60.0 / 1e-2


def test_rare_long_stalls_are_seen_and_the_choice_holds():
    """A busy machine as measured: most 2-thread calls are fast, one in ten waits 5 ms for a
    descheduled worker (mean 0.59 ms) against 0.39 ms on one thread.  One probe call at 2
    threads is fast nine times in ten, so judging by one call flipped the choice back and
    forth (271 switches in 20 s, 92 % of the 1-thread rate); a probe over many calls sees the
    stalls and settles."""
    rng = random.Random(0)
    machine = Machine({1: 3.9e-4, 2: 1e-4})

    def kernel():
        stalled = machine.threads == 2 and rng.random() < 0.1
        machine.now += 5e-3 if stalled else machine.cost[machine.threads]

    gov = ThreadGovernor(2, machine.apply, machine.clock)
    calls = 0
    while machine.now < 20.0:
        gov.run("gemv", kernel)
        calls += 1
    assert gov.choice == 1 and gov.switches <= 5
    assert calls >= 0.97 * 20.0 / 3.9e-4


def test_an_idle_machine_keeps_every_thread():
    machine = Machine({1: 1.8e-2, 2: 1e-2})
    gov = ThreadGovernor(2, machine.apply, machine.clock)
    calls = run(gov, machine, 60.0)
    assert gov.choice == 2 and gov.switches == 0
    assert calls >= 0.97 * 60.0 / 1e-2


@pytest.mark.parametrize("before, after, best", [
    ({1: 1.8e-2, 2: 1e-2}, {1: 1e-2, 2: 8e-2}, 1),  # another process starts
    ({1: 1e-2, 2: 8e-2}, {1: 1.8e-2, 2: 1e-2}, 2),  # ...and stops
])
def test_the_choice_follows_the_machine(before, after, best):
    machine = Machine(before)
    gov = ThreadGovernor(2, machine.apply, machine.clock)
    run(gov, machine, 30.0)
    assert gov.choice != best
    machine.cost = after
    # a few probes, each at most PROBE_MAX_S apart, are enough to move
    run(gov, machine, 4 * PROBE_MAX_S)
    assert gov.choice == best
    calls = run(gov, machine, 30.0)
    assert calls >= 0.97 * 30.0 / after[best]


def test_keys_are_compared_with_themselves():
    # a big kernel and a small one: the small one's time must not pass for a fast thread count
    machine = Machine({1: 1.8e-2, 2: 1e-2})
    gov = ThreadGovernor(2, machine.apply, machine.clock)
    for _ in range(2000):
        gov.run("big", machine.kernel)
        gov.run("small", lambda: setattr(machine, "now", machine.now + machine.cost[machine.threads] / 100))
    assert gov.choice == 2 and gov.switches == 0


def test_one_thread_is_left_alone():
    machine = Machine({1: 1e-2})
    machine.threads = 1
    gov = ThreadGovernor(1, machine.apply, machine.clock)
    assert run(gov, machine, 1.0) == 100
    assert machine.applied == []


def test_the_count_is_set_only_when_it_changes():
    machine = Machine({1: 1.8e-2, 2: 1e-2})
    gov = ThreadGovernor(2, machine.apply, machine.clock)
    calls = run(gov, machine, 60.0)
    # one initial set, then two per probe (to 1 and back): probes are rare once settled
    assert len(machine.applied) < 2 * (60.0 / PROBE_MAX_S + 12)
    assert calls > 10 * len(machine.applied)


def test_calls_that_follow_run_at_the_choice_even_during_a_probe():
    """sgemm's last bits depend on its thread count: the same product computed twice on an
    idle machine must not differ because a probe (at one thread) covered one of them."""
    machine = Machine({1: 1.8e-4, 2: 1e-4})
    gov = ThreadGovernor(2, machine.apply, machine.clock)
    seen = set()
    for _ in range(50_000):
        gov.run("gemv", machine.kernel)
        gov.follow(lambda: seen.add(machine.threads))
    assert 1 in machine.applied  # probes ran at one thread...
    assert seen == {2}  # ...and no following call did
    assert gov.follow(lambda a, b=0: a + b, 2, b=3) == 5


def test_results_pass_through():
    gov = ThreadGovernor(2, lambda n: None)
    assert gov.run("k", lambda a, b=0: a + b, 2, b=3) == 5
