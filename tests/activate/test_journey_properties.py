"""Property tests: entry rules and the no-response rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.activate.journeys import Verdict, admit, no_response_verdict
from closedloop.activate.triggers import Candidate
from closedloop.core.definitions.campaigns import Entry, EntryRule
from closedloop.core.definitions.policy import NoResponse

T0 = datetime(2026, 1, 1, tzinfo=UTC)

candidates = st.lists(
    st.builds(
        Candidate,
        customer_id=st.sampled_from(["a", "b", "c"]),
        occasion=st.sampled_from(["o1", "o2", "o3", "o4"]),
        at=st.integers(0, 60 * 24 * 20).map(lambda m: T0 + timedelta(minutes=m)),
        trigger_id=st.just("t"),
    ),
    max_size=30,
)
entries = st.one_of(
    st.just(Entry(rule=EntryRule.ONCE)),
    st.just(Entry(rule=EntryRule.ONCE_PER_OCCASION)),
    st.integers(1, 10).map(lambda d: Entry(rule=EntryRule.COOLDOWN, cooldown=timedelta(days=d))),
)
pasts = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.lists(
        st.tuples(
            st.sampled_from(["o1", "o2", "o9"]),
            st.integers(-60 * 24 * 10, 0).map(lambda m: T0 + timedelta(minutes=m)),
        ),
        max_size=2,
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(entries, candidates, pasts, st.sets(st.sampled_from(["a", "b", "c"])))
def test_entry_rules_hold_and_admit_everyone_they_may(
    entry: Entry,
    cands: list[Candidate],
    past: dict[str, list[tuple[str, datetime]]],
    live: set[str],
) -> None:
    got = admit(entry, cands, past, live)
    assert all(c in cands for c in got)
    # Nobody inside an instance enters; at most one new instance per person per batch
    # (the first admitted is live until it ends).
    assert not {c.customer_id for c in got} & live
    people = [c.customer_id for c in got]
    assert len(people) == len(set(people))
    for c in got:
        mine = past.get(c.customer_id, [])
        assert c.occasion not in {o for o, _ in mine}
        if entry.rule is EntryRule.ONCE:
            assert not mine
        if entry.rule is EntryRule.COOLDOWN:
            assert entry.cooldown is not None
            assert all(c.at - at >= entry.cooldown for _, at in mine)
    # Maximal: the earliest candidate of a person nobody blocks is admitted.
    for person in {c.customer_id for c in cands} - live:
        mine = past.get(person, [])
        first = min((c for c in cands if c.customer_id == person), key=lambda c: (c.at, c.occasion))
        blocked = first.occasion in {o for o, _ in mine} or (
            entry.rule is EntryRule.ONCE and bool(mine)
        )
        if entry.rule is EntryRule.COOLDOWN:
            assert entry.cooldown is not None
            blocked |= any(first.at - at < entry.cooldown for _, at in mine)
        if not blocked:
            assert person in people


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0.5, 200),
    st.one_of(st.none(), st.integers(0, 300 * 60).map(lambda m: T0 + timedelta(minutes=m))),
    st.booleans(),
    st.integers(0, 400 * 60).map(lambda m: T0 + timedelta(minutes=m)),
)
def test_no_response_never_sends_after_an_unanswered_message(
    hours: float, last_sent: datetime | None, responded: bool, now: datetime
) -> None:
    rule = NoResponse(within_hours=hours)
    verdict, deadline = no_response_verdict(rule, last_sent, responded, now)
    if last_sent is None or responded:
        assert verdict is Verdict.SEND
        return
    assert verdict is not Verdict.SEND
    window_over = now >= last_sent + timedelta(hours=hours)
    assert (verdict is Verdict.STOP) == window_over
    if verdict is Verdict.WAIT:
        assert deadline == last_sent + timedelta(hours=hours) and deadline > now
    # Without the rule nothing is stopped.
    assert no_response_verdict(None, last_sent, responded, now) == (Verdict.SEND, None)
