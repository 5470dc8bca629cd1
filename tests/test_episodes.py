"""Episode assembly: completion, duplicates, out-of-order steps, abandonment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from oel.episodes import AddResult, EpisodeStatus, add_event, close
from oel.schemas import TrajectoryEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(seq: int, kind: str, **payload) -> TrajectoryEvent:
    body = {"start": {"task": "greet"}} if kind == "start" else {}
    if kind == "step":
        body = {"step": {"prompt": f"turn {seq}", "response": f"answer {seq}", "feedback": f"fb {seq}"}}
    if kind == "end":
        body = {"end": {"outcome": "accepted", "success": True}}
    fields = dict(
        event_id=f"e{seq}", namespace="ns", episode_id="ep", agent_id="a", model_version="base",
        seq=seq, kind=kind, ts=T0 + timedelta(seconds=seq), **body,
    )
    fields.update(payload)
    return TrajectoryEvent(**fields)


def feed(events):
    buf, results = None, []
    for e in events:
        buf, r = add_event(buf, e, now=0.0)
        results.append(r)
    return buf, results


def test_in_order_episode_completes_on_its_end_event():
    buf, results = feed([ev(0, "start"), ev(1, "step"), ev(2, "step"), ev(3, "end")])
    assert results == [AddResult.accepted] * 3 + [AddResult.complete]
    episode = close(buf, abandoned=False)
    assert episode.status is EpisodeStatus.completed
    assert [s.response for s in episode.steps] == ["answer 1", "answer 2"]
    assert episode.training_prefixes[0][0].content == "turn 1"
    assert episode.start.task == "greet" and episode.end.outcome == "accepted"
    assert (episode.started_at, episode.ended_at) == (T0, T0 + timedelta(seconds=3))


def test_out_of_order_steps_wait_for_the_gap_and_are_ordered():
    buf, results = feed([ev(0, "start"), ev(2, "step"), ev(3, "end"), ev(1, "step")])
    assert results == [AddResult.accepted, AddResult.accepted, AddResult.accepted, AddResult.complete]
    assert [s.response for s in close(buf, abandoned=False).steps] == ["answer 1", "answer 2"]


def test_duplicates_by_event_id_or_sequence_number_are_ignored():
    buf, results = feed([ev(0, "start"), ev(1, "step"), ev(1, "step"), ev(1, "step", event_id="other"), ev(2, "end")])
    assert results == [AddResult.accepted, AddResult.accepted, AddResult.duplicate, AddResult.duplicate, AddResult.complete]
    assert len(close(buf, abandoned=False).steps) == 1


def test_abandoned_episode_keeps_what_arrived_and_says_so():
    buf, _ = feed([ev(0, "start"), ev(1, "step"), ev(3, "step")])
    episode = close(buf, abandoned=True, idle_s=300)
    assert episode.status is EpisodeStatus.abandoned
    assert len(episode.steps) == 2 and episode.missing_seqs == [2]
    assert "abandoned" in episode.end.outcome and episode.end.success is None


def test_event_of_another_namespace_is_a_conflict():
    buf, _ = feed([ev(0, "start")])
    other = ev(1, "step").model_copy(update={"namespace": "elsewhere"})
    _, result = add_event(buf, other, now=0.0)
    assert result is AddResult.conflict
