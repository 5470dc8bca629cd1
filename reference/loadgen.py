"""Load generator: realistic trajectory traffic at a target rate, for benchmarks and soak tests.

Two sources of episodes:

* **synthetic** (:func:`synthetic_episodes`): episodes shaped like the reference agents' — a
  support-assistant task, 1-5 turns, each turn a chat prompt (system rules + the request + the
  previous reply and its feedback) and a reply, so that an event is ~0.5-2 KB of JSON like a chat
  agent's; the last turn is accepted or the turn limit ends it;
* **replay** (:func:`replay_episodes`): the episodes of a JSONL file of TrajectoryEvents (what
  ``oel.trajectories`` carries; :func:`run` can record one with ``record=``), re-sent with fresh
  episode ids so a replay never collides with the original.

Events go through the real :class:`~producers.recorder.Recorder` (validation, back-pressure,
idempotent delivery), ``concurrency`` episodes interleaved as a fleet of agents would, paced by a
token bucket at ``rate`` events/s. Runs are bounded by ``duration_s`` and/or ``episodes``; open
episodes are finished after the bound, so every episode sent is complete.

Run it as ``oel loadgen --rate 500 --duration 30`` (see ``oel loadgen --help``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from oel.schemas import EventKind, TrajectoryEvent, decode
from oel.versions import BASE_VERSION
from producers.recorder import Episode, Recorder, RecorderStats

# --- episode shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to send: who played it, with which version, and its turns and ending."""

    namespace: str
    agent_id: str
    model_version: str
    task: str | None
    metadata: dict[str, str]
    steps: list[dict[str, Any]]  # kwargs of Episode.step: prompt, response, action, feedback
    outcome: str
    success: bool | None

    @property
    def events(self) -> int:
        return len(self.steps) + 2


_WORDS = (
    "order refund invoice delivery account password shipping address customer request reply policy "
    "please thank you sorry team support ticket number product warranty return label payment card "
    "confirm update status week business days store credit exchange size colour email phone help "
    "issue resolved escalate manager note details receipt item package tracking carrier delayed "
    "damaged replacement subscription cancel renew plan upgrade downgrade billing cycle charge "
    "discount code coupon expired valid apply checkout cart total tax fee free standard express "
    "the a to of and in for on with your we our is are be will can have has this that it as at "
    "by from not or if when which would could should may might must also only just still already"
).split()

_RULES = [
    "end the reply with the sign-off 'Best regards, the Support Team'",
    "stay under 80 words",
    "quote the order number given in the request",
    "start with the greeting 'Hello from Support!'",
    "never use the word 'unfortunately'",
]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    """Filler prose of lo..hi characters."""
    target = rng.randint(lo, hi)
    words: list[str] = []
    n = 0
    while n < target:
        w = rng.choice(_WORDS)
        words.append(w)
        n += len(w) + 1
    s = " ".join(words)[:target]
    return s[:1].upper() + s[1:] + "."


def synthetic_episodes(
    rng: random.Random,
    namespaces: list[str],
    agents: int = 16,
    model_version: str = BASE_VERSION,
    max_turns: int = 5,
) -> Iterator[EpisodeSpec]:
    """An endless stream of support-assistant episodes of 1..max_turns turns (events ~0.5-2 KB)."""
    system = (
        "You are a customer-support assistant. Decisions are based on learned experience that may be "
        "incomplete or wrong. Follow the house rules; the reviewer tells you what was wrong with a reply."
    )
    while True:
        namespace = rng.choice(namespaces)
        order = f"#{rng.randint(10000, 99999)}"
        request = f"Order {order}: " + _text(rng, 60, 200)
        turns = rng.randint(1, max_turns)
        success = turns < max_turns or rng.random() < 0.3
        steps: list[dict[str, Any]] = []
        previous: list[dict[str, str]] = []
        for t in range(turns):
            response = _text(rng, 120, 450)
            last = t == turns - 1
            feedback = "Accepted." if last and success else f"Rejected: the reply must {rng.choice(_RULES)}. " + _text(rng, 20, 80)
            prompt = [{"role": "system", "content": system}, {"role": "user", "content": request}, *previous]
            steps.append({"prompt": prompt, "response": response, "action": "reply", "feedback": feedback})
            # the next turn sees only the last exchange, as the reference agents keep their prompts short
            previous = [{"role": "assistant", "content": response}, {"role": "user", "content": feedback}]
        outcome = (
            f"Accepted on turn {turns}. " if success else f"Not accepted within {max_turns} turns; last feedback: {steps[-1]['feedback']} "
        ) + _text(rng, 100, 300)
        yield EpisodeSpec(
            namespace=namespace,
            agent_id=f"loadgen-{rng.randrange(agents)}",
            model_version=model_version,
            task=request,
            metadata={"env": "house-rules", "source": "loadgen", "seed": str(rng.randrange(1 << 30))},
            steps=steps,
            outcome=outcome,
            success=success,
        )


def read_episodes(path: Path) -> list[EpisodeSpec]:
    """The complete episodes of a JSONL file of TrajectoryEvents, in the order their start events appear.

    Episodes without a start or an end event are skipped (a partial recording); lines that are not
    valid events raise with the line number.
    """
    by_id: dict[str, list[TrajectoryEvent]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                event = decode(line, TrajectoryEvent)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a trajectory event: {exc}") from None
            by_id.setdefault(event.episode_id, []).append(event)
    specs = []
    for events in by_id.values():
        events.sort(key=lambda e: e.seq)
        start = next((e for e in events if e.kind is EventKind.start), None)
        end = next((e for e in events if e.kind is EventKind.end), None)
        if start is None or end is None:
            continue
        first = events[0]
        specs.append(
            EpisodeSpec(
                namespace=first.namespace,
                agent_id=first.agent_id,
                model_version=first.model_version,
                task=start.start.task if start.start else None,
                metadata=dict(start.start.metadata) if start.start else {},
                steps=[
                    {
                        "prompt": [m.model_dump() for m in e.step.prompt],
                        "response": e.step.response,
                        "action": e.step.action,
                        "feedback": e.step.feedback,
                    }
                    for e in events
                    if e.kind is EventKind.step and e.step is not None
                ],
                outcome=end.end.outcome if end.end else "",
                success=end.end.success if end.end else None,
            )
        )
    return specs


def replay_episodes(path: Path, loop: bool = True) -> Iterator[EpisodeSpec]:
    """The episodes of a recording, over and over (``loop``) or once. The file is read (and checked:
    ValueError if it holds no complete episode) now, not when the first episode is asked for."""
    specs = read_episodes(path)
    if not specs:
        raise ValueError(f"{path}: no complete episode (start ... end) in the file")

    def episodes() -> Iterator[EpisodeSpec]:
        while True:
            yield from specs
            if not loop:
                return

    return episodes()


# --- pacing --------------------------------------------------------------------------------------------


class TokenBucket:
    """Paces events at ``rate`` per second with bursts of at most ``burst`` (sleeps, never spins)."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 50)  # 20 ms worth
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    def take(self, n: float = 1.0) -> None:
        while True:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            time.sleep((n - self.tokens) / self.rate)


# --- running -----------------------------------------------------------------------------------------


@dataclass
class LoadgenReport:
    """What a run sent and how fast: ``rate`` is events/s over ``elapsed_s`` (until the last send)."""

    events: int = 0
    episodes: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0
    target_rate: float | None = None
    stats: RecorderStats | None = None
    progress: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        target = f" (target {self.target_rate:g})" if self.target_rate else ""
        kb = self.bytes / self.events / 1024 if self.events else 0.0
        s = self.stats
        delivery = f"; delivered {s.delivered}, failed {s.failed}, buffered {s.buffered}" if s else ""
        return (
            f"sent {self.events} events in {self.episodes} episodes in {self.elapsed_s:.1f}s: "
            f"{self.rate:.1f} events/s{target}, {kb:.2f} KB/event{delivery}"
        )


def run(
    recorder: Recorder,
    source: Iterable[EpisodeSpec],
    *,
    rate: float | None = None,
    duration_s: float | None = None,
    episodes: int | None = None,
    concurrency: int = 16,
    seed: int = 0,
    record: IO[str] | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 1.0,
    flush_timeout_s: float = 30.0,
) -> LoadgenReport:
    """Send episodes from ``source`` through ``recorder`` until ``duration_s`` or ``episodes`` is reached.

    ``rate`` (events/s; None = as fast as the recorder takes them) paces every event. ``concurrency``
    episodes are open at once and their events interleave. ``record`` receives every event sent as a
    JSON line (a file :func:`replay_episodes` can replay). ``progress`` is called with a status line
    every ``progress_every_s``. At the end the recorder is flushed (not closed).
    """
    if duration_s is None and episodes is None:
        raise ValueError("bound the run: give duration_s, episodes or both")
    rng = random.Random(seed)
    bucket = TokenBucket(rate) if rate else None
    report = LoadgenReport(target_rate=rate)
    source_iter = iter(source)
    open_eps: list[tuple[Episode, EpisodeSpec, int]] = []  # (episode, spec, next step index; -1 = not started)
    previous_tap = recorder.tap
    if record is not None:

        def tap(value: bytes) -> None:
            record.write(value.decode() + "\n")
            if previous_tap is not None:
                previous_tap(value)

        recorder.tap = tap
    t0 = time.monotonic()
    deadline = t0 + duration_s if duration_s is not None else float("inf")
    next_progress = t0 + progress_every_s
    exhausted = False

    def may_start() -> bool:
        return not exhausted and time.monotonic() < deadline and (episodes is None or report.episodes < episodes)

    try:
        while True:
            while len(open_eps) < concurrency and may_start():
                spec = next(source_iter, None)
                if spec is None:
                    exhausted = True
                    break
                ep = recorder.episode(spec.namespace, spec.agent_id, spec.model_version, task=spec.task, metadata=spec.metadata)
                open_eps.append((ep, spec, -1))
                report.episodes += 1
            if not open_eps:
                break
            i = rng.randrange(len(open_eps))
            ep, spec, k = open_eps[i]
            if bucket is not None:
                bucket.take()
            if k < 0:
                ep.start()
            elif k < len(spec.steps):
                ep.step(**spec.steps[k])
            else:
                ep.end(spec.outcome, spec.success)
            if k >= len(spec.steps):
                report.bytes += ep.bytes_sent
                open_eps[i] = open_eps[-1]
                open_eps.pop()
            else:
                open_eps[i] = (ep, spec, k + 1)
            report.events += 1
            now = time.monotonic()
            if progress is not None and now >= next_progress:
                next_progress = now + progress_every_s
                s = recorder.stats()
                line = (
                    f"[{now - t0:6.1f}s] {report.events} events, {report.episodes} episodes, "
                    f"{report.events / (now - t0):.1f} events/s, delivered {s.delivered}, failed {s.failed}, buffered {s.buffered}"
                )
                report.progress.append(line)
                progress(line)
    finally:
        recorder.tap = previous_tap
    report.elapsed_s = time.monotonic() - t0
    recorder.flush(flush_timeout_s)
    report.stats = recorder.stats()
    return report


def write_jsonl(events: Iterable[TrajectoryEvent], path: Path) -> int:
    """Write events as JSON lines (the replay format); returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for e in events:
            fh.write(e.to_bytes().decode() + "\n")
            n += 1
    return n
