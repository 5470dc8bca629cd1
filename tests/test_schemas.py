"""Event schemas: round trips, and rejections that name the field."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oel.schemas import (
    ID_MAX_CHARS,
    ID_PATTERN,
    EventKind,
    ExperienceUpdate,
    InvalidMessage,
    ModelVersion,
    TrajectoryEvent,
    VersionStatus,
    decode,
)

BASE = dict(namespace="house-rules", episode_id="ep-1", agent_id="agent-7", model_version="base")


def step_event(**over):
    fields = dict(
        BASE,
        seq=1,
        kind="step",
        step={"prompt": "Reply to the customer.", "response": "Hello! [done]", "action": "done", "feedback": "too long"},
    )
    fields.update(over)
    return TrajectoryEvent.model_validate(fields)


def test_round_trips():
    events = [
        TrajectoryEvent(**BASE, seq=0, kind=EventKind.start, start={"task": "greet", "metadata": {"env": "shop"}}),
        step_event(),
        TrajectoryEvent(**BASE, seq=2, kind=EventKind.end, end={"outcome": "accepted after 1 turn", "success": True}),
        ExperienceUpdate(namespace="house-rules", kb_version="kb-3f2a", new_item_ids=["a", "b"], total_items=9),
        ModelVersion(
            namespace="house-rules",
            version="house-rules-v0002",
            base_model="SmolLM2-135M-Instruct",
            base_model_hash="ab12",
            status=VersionStatus.promoted,
            eval={"pass_rate": 0.25},
        ),
    ]
    for event in events:
        assert decode(event.to_bytes(), type(event)) == event
    assert events[1].step.prompt[0].role == "user"  # a plain prompt is one user message


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("namespace"), "namespace"),
        (lambda d: d.update(namespace="Has Spaces"), "namespace"),
        (lambda d: d.update(seq=-1), "seq"),
        (lambda d: d.update(kind="jump"), "kind"),
        (lambda d: d.update(step=None), "kind 'step' needs a 'step' payload"),
        (lambda d: d.update(end={"outcome": "x"}), "must not carry a 'end' payload"),
        (lambda d: d["step"].pop("response"), "step.response"),
        (lambda d: d["step"].update(prompt=[]), "step.prompt"),
        (lambda d: d["step"].update(prompt=[{"role": "robot", "content": "x"}]), "step.prompt.0.role"),
        (lambda d: d.update(ts="2026-01-01T00:00:00"), "timezone"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d.update(schema_version=2), "schema_version"),
    ],
)
def test_rejections_name_the_field(mutate, field):
    doc = json.loads(step_event().to_bytes())
    mutate(doc)
    with pytest.raises(InvalidMessage) as err:
        decode(json.dumps(doc), TrajectoryEvent)
    assert field in err.value.reason


def test_not_json_empty_and_oversized():
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        decode(b"{nope", TrajectoryEvent)
    with pytest.raises(InvalidMessage, match="empty"):
        decode(None, TrajectoryEvent)
    big = step_event(step={"prompt": "x" * 5000, "response": "y"}).to_bytes()
    with pytest.raises(InvalidMessage, match="over the limit of 4096"):
        decode(big, TrajectoryEvent, max_bytes=4096)
    assert decode(big, TrajectoryEvent, max_bytes=len(big)).seq == 1


def test_timestamps_are_utc_aware():
    ev = step_event()
    assert isinstance(ev.ts, datetime) and ev.ts.utcoffset().total_seconds() == 0


# --- properties (hypothesis) -------------------------------------------------------------------------

GOOD_IDS = st.from_regex(ID_PATTERN, fullmatch=True).filter(lambda s: len(s) <= ID_MAX_CHARS)


def _start(episode_id: str) -> dict:
    return {
        "schema_version": 1,
        "event_id": "e-1",
        "namespace": "ns",
        "episode_id": episode_id,
        "agent_id": "a",
        "model_version": "base",
        "seq": 0,
        "ts": "2026-12-06T10:00:00Z",
        "kind": "start",
        "start": {"task": None},
    }


@settings(max_examples=300, deadline=None)
@given(GOOD_IDS)
def test_every_id_of_the_documented_set_is_accepted_and_round_trips(episode_id):
    event = decode(json.dumps(_start(episode_id)).encode(), TrajectoryEvent)
    assert decode(event.to_bytes(), TrajectoryEvent) == event


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: not re.fullmatch(ID_PATTERN, s)))
def test_every_other_id_is_refused_naming_the_field(episode_id):
    with pytest.raises(InvalidMessage, match="episode_id"):
        decode(json.dumps(_start(episode_id)).encode(), TrajectoryEvent)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decoding_arbitrary_bytes_either_succeeds_or_says_why(raw):
    try:
        decode(raw, TrajectoryEvent, max_bytes=1000)
    except InvalidMessage as exc:
        assert exc.reason
