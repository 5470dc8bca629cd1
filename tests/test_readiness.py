"""/readyz next to /metrics: a service whose broker or store is unreachable is live but not ready
(reliability-hardening, defect 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from test_processor import free_port

from oel import metrics
from oel.settings import MetricsSettings


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_readyz_follows_the_registered_checks():
    problem: list[str] = ["broker down"]
    metrics.add_readiness_check("test-dependency", lambda: problem[0] if problem else None)
    port = metrics.start_metrics_server(MetricsSettings(port=free_port()), "test")
    try:
        status, text = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and "test-dependency: broker down" in text
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # live all the same
        problem.clear()
        assert _get(f"http://127.0.0.1:{port}/readyz") == (200, "test-dependency: ok\n")
    finally:
        metrics.READINESS_CHECKS.pop("test-dependency")
        metrics.stop_metrics_servers(port)


@pytest.mark.stack
def test_a_learner_whose_broker_is_down_is_not_ready(s3_store, tmp_path):
    """A port where nothing listens stands for the broker that is down; the store is the real MinIO."""
    broker, port = f"127.0.0.1:{free_port()}", free_port()
    env = {**os.environ, "OEL_KAFKA__BOOTSTRAP_SERVERS": broker, "OEL_METRICS__PORT": str(port)}
    with open(tmp_path / "learner.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "learner.service"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = _get(f"http://127.0.0.1:{port}/readyz")
                break
            except OSError:
                time.sleep(0.5)
        assert answer is not None, (tmp_path / "learner.log").read_text()[-3000:]
        status, text = answer
        assert status == 503, text
        assert f"kafka: Kafka at {broker}" in text and "object store: ok" in text, text
    finally:
        proc.terminate()
        proc.wait(30)
