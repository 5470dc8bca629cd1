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
        event_id=f"e{seq}",
        namespace="ns",
        episode_id="ep",
        agent_id="a",
        model_version="base",
        seq=seq,
        kind=kind,
        ts=T0 + timedelta(seconds=seq),
        **body,
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


def test_assemble_says_what_to_do_with_each_record():
    """The one assembler of the processor and the demo: decode, key check, tombstones, size limit, conflicts."""
    from oel.episodes import Action, ClosedEpisode, assemble

    table: dict = {}

    def step(event: TrajectoryEvent | None, *, key: bytes | None = b"ep", value: bytes | None = None, max_episode_bytes: int = 10_000):
        out = assemble(
            key, value if value is not None else event.to_bytes(), table.get, 0.0, max_event_bytes=4096, max_episode_bytes=max_episode_bytes
        )
        if out.action is Action.keep_open:
            table[out.event.episode_id] = out.buffer
        elif out.action in (Action.close, Action.close_truncated):
            table[out.event.episode_id] = ClosedEpisode(truncated=out.action is Action.close_truncated)
        return out

    assert step(None, value=b"{not json").action is Action.dead_letter
    wrong_key = step(ev(0, "start"), key=b"other")
    assert wrong_key.action is Action.dead_letter and "is not the episode id" in wrong_key.reason
    assert step(ev(0, "start")).action is Action.keep_open
    assert step(ev(0, "start")).action is Action.ignore  # a duplicate
    conflict = step(ev(1, "step", namespace="other-ns", event_id="x1"))
    assert conflict.action is Action.dead_letter and "differs" in conflict.reason
    assert step(ev(1, "step")).action is Action.keep_open
    done = step(ev(2, "end"))
    assert done.action is Action.close and close(done.buffer, abandoned=False).status is EpisodeStatus.completed
    assert step(ev(2, "end")).action is Action.ignore  # late duplicate of a closed episode

    table.clear()
    step(ev(0, "start"))
    big = step(ev(1, "step"), max_episode_bytes=400)
    assert big.action is Action.close_truncated and "OEL_TOPICS__MAX_EPISODE_BYTES" in big.reason and big.close_reason
    late = step(ev(2, "end"))
    assert late.action is Action.dead_letter and "closed at its size limit" in late.reason
