"""`oel stack up` twice starts one of each service, `down` stops exactly those.

Runs a second, private stack on other ports and another state directory, so the stack the rest of
the suite uses is left alone. Jars and binaries come from the shared cache (installed by `up`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("kafka", "minio", "prometheus")


def _pids(state: Path) -> dict[str, int]:
    out = {}
    for name in SERVICES:
        pf = state / name / f"{name}.pid"
        if pf.exists():
            out[name] = int(pf.read_text())
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture
def private_stack(tmp_path):
    env = {
        **os.environ,
        "OEL_PATHS__STATE_DIR": str(tmp_path / "state"),
        "OEL_STACK_KAFKA_PORT": "19092",
        "OEL_STACK_KAFKA_CONTROLLER_PORT": "19093",
        "OEL_STACK_MINIO_PORT": "19000",
        "OEL_STACK_MINIO_CONSOLE_PORT": "19001",
        "OEL_STACK_PROMETHEUS_PORT": "19090",
    }
    yield env, tmp_path / "state"
    subprocess.run([sys.executable, "-m", "oel.cli", "stack", "down"], env=env, capture_output=True)


def oel(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oel.cli", *args], env=env, capture_output=True, text=True, timeout=600)


def test_up_twice_then_down(private_stack):
    env, state = private_stack
    first = oel(env, "stack", "up")
    assert first.returncode == 0, first.stderr
    pids = _pids(state)
    assert set(pids) == set(SERVICES) and all(_alive(p) for p in pids.values())

    second = oel(env, "stack", "up")
    assert second.returncode == 0, second.stderr
    assert _pids(state) == pids, "a second `up` started new processes"
    assert second.stderr.count("already running") == 3

    status = oel(env, "stack", "status")
    assert status.returncode == 0 and status.stdout.count("running") == 3
    assert "19092" in status.stdout and "19000" in status.stdout and "19090" in status.stdout
    stack_env = (state / "stack.env").read_text()
    assert "OEL_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:19092" in stack_env
    assert "OEL_S3__ENDPOINT=127.0.0.1:19000" in stack_env

    # The private stack really serves: the smoke run goes through its Kafka and MinIO.
    smoke = oel(env, "smoke")
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "127.0.0.1:19092" in smoke.stdout

    down = oel(env, "stack", "down")
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids.values())
    assert _pids(state) == {}
    assert oel(env, "stack", "status").returncode != 0


def test_up_refuses_a_port_taken_by_another_process(private_stack):
    import socket

    env, state = private_stack
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 19090))
        sock.listen()
        env = {**env, "OEL_STACK_KAFKA_PORT": "19190", "OEL_STACK_KAFKA_CONTROLLER_PORT": "19193", "OEL_STACK_MINIO_PORT": "19100", "OEL_STACK_MINIO_CONSOLE_PORT": "19101"}
        proc = oel(env, "stack", "up")
    assert proc.returncode != 0
    assert "prometheus: port 127.0.0.1:19090 is already in use" in proc.stderr
