"""/livez next to /readyz and /metrics: liveness from each service's own progress (a consume loop that stopped
polling, a blocked event loop, a crashed consumer, waiting input that nobody consumes), never from /metrics,
which stays up when a consumer is stuck."""

from __future__ import annotations

import time
from types import SimpleNamespace

from test_processor import free_port
from test_readiness import _get

from oel import metrics
from oel.settings import MetricsSettings


def test_livez_follows_the_registered_checks():
    problem: list[str] = ["consumer stuck"]
    metrics.add_liveness_check("test-loop", lambda: problem[0] if problem else None)
    port = metrics.start_metrics_server(MetricsSettings(port=free_port()), "test")
    try:
        status, text = _get(f"http://127.0.0.1:{port}/livez")
        assert status == 503 and "test-loop: consumer stuck" in text
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # what the old probe saw: up all the same
        problem.clear()
        assert _get(f"http://127.0.0.1:{port}/livez") == (200, "test-loop: ok\n")
    finally:
        metrics.LIVENESS_CHECKS.pop("test-loop")
        metrics.stop_metrics_servers(port)


def test_heartbeat_is_quiet_before_the_first_beat_and_reports_a_stall():
    hb = metrics.Heartbeat("a loop", max_age_s=0.05)
    assert hb.problem() is None  # starting up: the startup probe's business
    hb.beat()
    assert hb.problem() is None
    time.sleep(0.1)
    assert "a loop: no progress for" in hb.problem()
    hb.beat()
    assert hb.problem() is None


def test_learner_is_live_during_a_long_round_and_not_when_its_loop_stops():
    from learner.service import LearnerService

    svc = SimpleNamespace(heartbeat=metrics.Heartbeat("loop", max_age_s=0.05), _in_round=False)
    check = lambda: LearnerService.liveness_problem(svc)  # noqa: E731
    svc.heartbeat.beat()
    time.sleep(0.1)
    assert "no progress" in check()
    svc._in_round = True
    assert check() is None


def test_processor_liveness_stalls_blocked_loop_and_crashed_consumer():
    from processors.app import Processor

    proc = SimpleNamespace(
        loop_beat=metrics.Heartbeat("timers", max_age_s=60),
        stall_s=900.0,
        _progress_at=time.monotonic(),
        app=SimpleNamespace(consumer=SimpleNamespace(crashed=False)),
    )
    check = lambda: Processor.liveness_problem(proc)  # noqa: E731
    proc.loop_beat.beat()
    assert check() is None
    proc._progress_at -= 1000  # events waiting, none consumed for 1000 s
    assert "none was consumed" in check()
    proc._progress_at = time.monotonic()
    proc.app.consumer.crashed = True
    assert check() == "the Kafka consumer crashed"
    proc.app.consumer.crashed = False
    proc.loop_beat.last -= 120
    assert "event loop" in check() or "timers" in check()
