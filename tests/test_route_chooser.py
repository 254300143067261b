"""RouteChooser and Availability: pure logic, with a fake view of the relays and a
fake clock (no database, no SMTP)."""

import collections
import threading

import pytest

from mailqueue.config import Route
from mailqueue.relays import Availability, HealthCache, RelayState, RouteChooser


class FakeView:
    """Relays that are down or out of quota, set by the test."""

    def __init__(self, unusable=()):
        self.unusable = set(unusable)

    def usable(self, relay):
        return relay not in self.unusable


FAILOVER = Route("transactional", ("ses", "postfix", "backup"))
ROUND_ROBIN = Route("bulk", ("a", "b", "c"), "round_robin")


def test_failover_takes_the_first_usable_relay_in_order():
    chooser = RouteChooser()
    view = FakeView()
    assert [chooser.choose(FAILOVER, view) for _ in range(5)] == ["ses"] * 5
    view.unusable = {"ses"}
    assert chooser.choose(FAILOVER, view) == "postfix"
    view.unusable = {"ses", "postfix"}
    assert chooser.choose(FAILOVER, view) == "backup"
    view.unusable = {"postfix"}
    assert chooser.choose(FAILOVER, view) == "ses", "back to the first as soon as it is usable"


def test_none_when_no_relay_of_the_route_is_usable():
    chooser = RouteChooser()
    view = FakeView({"ses", "postfix", "backup", "a", "b", "c"})
    assert chooser.choose(FAILOVER, view) is None
    assert chooser.choose(ROUND_ROBIN, view) is None


def within_15_percent(counts, relays, total):
    share = total / len(relays)
    return all(abs(counts[relay] - share) <= 0.15 * share for relay in relays)


def test_round_robin_spreads_1000_choices_evenly():
    chooser = RouteChooser()
    counts = collections.Counter(chooser.choose(ROUND_ROBIN, FakeView()) for _ in range(1000))
    assert set(counts) == {"a", "b", "c"}
    assert within_15_percent(counts, "abc", 1000), counts


def test_round_robin_skips_relays_down_or_out_of_quota_and_stays_even_over_the_others():
    chooser = RouteChooser()
    view = FakeView()
    counts = collections.Counter()
    for n in range(1000):
        # b is down for the second quarter, c out of quota for the third
        view.unusable = {1: {"b"}, 2: {"c"}}.get(n // 250, set())
        relay = chooser.choose(ROUND_ROBIN, view)
        assert relay not in view.unusable
        counts[relay] += 1
    # a took part of b's and c's shares; over the choices where all three were
    # usable, each had an equal share
    assert counts["a"] > counts["b"] and counts["a"] > counts["c"]
    both = collections.Counter()
    view.unusable = {"b"}
    for _ in range(1000):
        both[chooser.choose(ROUND_ROBIN, view)] += 1
    assert set(both) == {"a", "c"} and within_15_percent(both, "ac", 1000), both


def test_each_route_rotates_on_its_own_and_threads_share_a_chooser():
    chooser = RouteChooser()
    other = Route("newsletter", ("a", "b", "c"), "round_robin")
    assert [chooser.choose(ROUND_ROBIN, FakeView()) for _ in range(2)] == ["a", "b"]
    assert chooser.choose(other, FakeView()) == "a", "its own position"
    counts = collections.Counter()
    lock = threading.Lock()

    def pick():
        for _ in range(300):
            relay = chooser.choose(ROUND_ROBIN, FakeView())
            with lock:
                counts[relay] += 1

    threads = [threading.Thread(target=pick) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counts.values()) == 1200
    assert within_15_percent(counts, "abc", 1200), counts


def test_availability_skips_a_relay_down_for_all_or_out_of_quota_for_a_while():
    now = [0.0]
    states = {"ses": RelayState("ses", down=True, probe_due=False)}
    health = HealthCache(lambda: states, clock=lambda: now[0])
    available = Availability(health, recheck=60, clock=lambda: now[0])
    assert not available.usable("ses") and available.usable("postfix")
    available.out_of_quota("postfix")
    assert RouteChooser().choose(FAILOVER, available) == "backup"
    now[0] += 59
    assert not available.usable("postfix")
    now[0] += 2
    assert available.usable("postfix"), "asked again as the quota's window moves"


@pytest.mark.parametrize("strategy", ["failover", "round_robin"])
def test_a_route_of_one_relay_always_gives_it_while_usable(strategy):
    route = Route("one", ("only",), strategy)
    chooser = RouteChooser()
    assert {chooser.choose(route, FakeView()) for _ in range(10)} == {"only"}
    assert chooser.choose(route, FakeView({"only"})) is None


def test_a_job_names_its_route_and_an_unknown_one_is_a_one_line_error():
    from mailqueue.relays import UnknownRoute, route_of

    routes = {"default": FAILOVER, "bulk": ROUND_ROBIN}
    assert route_of(routes, None) is FAILOVER and route_of(routes, "bulk") is ROUND_ROBIN
    with pytest.raises(UnknownRoute) as caught:
        route_of(routes, "newsleter\r\nX")
    assert str(caught.value) == (
        "the route 'newsleter X' is not in the configuration (known: bulk, default)"
    )


def test_a_note_made_while_the_health_is_being_read_is_not_lost():
    now = [0.0]
    cache = None

    def reader():  # another thread marks ses down while this read is under way
        cache.note_down("ses", "connection refused")
        return {"ses": RelayState("ses", down=False, probe_due=False)}

    cache = HealthCache(reader, clock=lambda: now[0])
    assert not cache.is_up("ses"), "the read began before the note: the note wins"
    now[0] += 2
    cache.reader = lambda: {"ses": RelayState("ses", down=False, probe_due=False)}
    assert cache.is_up("ses"), "a read begun after the note is the truth again"
