"""The in-process bus of `oel demo`, and the recorder SDK writing to it (the demo's agents record their
episodes exactly as deployed agents do)."""

from __future__ import annotations

from dataclasses import dataclass, field

from oel.bus import BusProducer, InProcessBus
from oel.schemas import EventKind, TrajectoryEvent, decode
from oel.settings import load_settings
from producers.recorder import Recorder
from reference.live_agent import episode_events, record_episode


@dataclass
class Turn:
    prompt: list
    response: str
    action: str | None = None
    feedback: str | None = None


@dataclass
class PlayedEpisode:
    """The fields of :class:`oel.rollout.Episode` that recording reads."""

    first_prompt: str = "Answer the customer."
    metadata: dict = field(default_factory=lambda: {"seed": "7"})
    turns: list = field(
        default_factory=lambda: [
            Turn([{"role": "user", "content": "Where is my order?"}], "It ships today.", None, "Rejected: greet first."),
            Turn([{"role": "user", "content": "Where is my order?"}], "Hello! It ships today.", None, "Accepted."),
        ]
    )
    outcome: str = "accepted on turn 2"
    passed: bool = True


def test_bus_keeps_order_and_each_group_its_position():
    bus = InProcessBus()
    for i in range(3):
        bus.publish("t", f"k{i}", b"v%d" % i)
    assert [m.offset for m in bus.read("t", "a", max_messages=2)] == [0, 1]
    assert [m.key for m in bus.read("t", "a")] == ["k2"] and bus.lag("t", "a") == 0
    assert bus.lag("t", "b") == 3 and bus.size("t") == 3


def test_the_recorder_on_the_bus_sends_a_played_episode_as_events():
    bus = InProcessBus()
    with Recorder(load_settings(), topic="trajectories", producer=BusProducer(bus)) as recorder:
        sent = record_episode(recorder, PlayedEpisode(), "house-rules", "agent-1", "base", episode_id="ep-1")
        assert recorder.flush(5) == 0
        assert recorder.stats().delivered == sent == 4  # start, two steps, end
    messages = bus.read("trajectories", "test")
    assert {m.key for m in messages} == {"ep-1"}
    events = [decode(m.value, TrajectoryEvent) for m in messages]
    assert [e.kind for e in events] == [EventKind.start, EventKind.step, EventKind.step, EventKind.end]
    assert [e.event_id for e in events] == ["ep-1.0", "ep-1.1", "ep-1.2", "ep-1.3"]
    assert events[0].start.task == "Answer the customer." and events[0].start.metadata == {"seed": "7"}
    assert events[2].step.feedback == "Accepted." and events[3].end.success is True
    again = episode_events(PlayedEpisode(), "house-rules", "ep-1", "agent-1", "base")
    assert [e.model_dump(exclude={"ts"}) for e in again] == [e.model_dump(exclude={"ts"}) for e in events]
