"""`oel stack up` twice starts one of each service, `down` stops exactly those.

Runs a second, private stack on other ports and another state directory, so the stack the rest of
the suite uses is left alone. Jars and binaries come from the shared cache (installed by `up`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.tools, pytest.mark.slow]

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


PORT_VARS = (
    "OEL_STACK_KAFKA_PORT",
    "OEL_STACK_KAFKA_CONTROLLER_PORT",
    "OEL_STACK_MINIO_PORT",
    "OEL_STACK_MINIO_CONSOLE_PORT",
    "OEL_STACK_PROMETHEUS_PORT",
)


def free_ports(n: int) -> list[int]:
    """Ports nothing listens on right now (the kernel picks them)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def private_stack(tmp_path):
    env = {**os.environ, "OEL_PATHS__STATE_DIR": str(tmp_path / "state")}
    env.update({var: str(port) for var, port in zip(PORT_VARS, free_ports(len(PORT_VARS)))})
    yield env, tmp_path / "state"
    subprocess.run([sys.executable, "-m", "oel.cli", "stack", "down"], env=env, capture_output=True)


def oel(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oel.cli", *args], env=env, capture_output=True, text=True, timeout=600)


def up_with_port_taken(env, port_var: str) -> subprocess.CompletedProcess:
    """`oel stack up` while another process listens on the port named by ``port_var``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(env[port_var])))
        sock.listen()
        return oel(env, "stack", "up")


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
    kafka_port, minio_port, prom_port = (env[v] for v in ("OEL_STACK_KAFKA_PORT", "OEL_STACK_MINIO_PORT", "OEL_STACK_PROMETHEUS_PORT"))
    assert all(f"127.0.0.1:{port}" in status.stdout for port in (kafka_port, minio_port, prom_port))
    stack_env = (state / "stack.env").read_text()
    assert f"OEL_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in stack_env
    assert f"OEL_S3__ENDPOINT=127.0.0.1:{minio_port}" in stack_env

    # The private stack really serves: the smoke run goes through its Kafka and MinIO.
    smoke = oel(env, "smoke")
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert f"127.0.0.1:{kafka_port}" in smoke.stdout

    down = oel(env, "stack", "down")
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids.values())
    assert _pids(state) == {}
    assert oel(env, "stack", "status").returncode != 0


def test_up_refuses_a_port_taken_by_another_process_and_down_cleans_up(private_stack):
    env, state = private_stack
    proc = up_with_port_taken(env, "OEL_STACK_PROMETHEUS_PORT")
    assert proc.returncode != 0
    assert f"prometheus: port 127.0.0.1:{env['OEL_STACK_PROMETHEUS_PORT']} is already in use" in proc.stderr
    started = _pids(state)
    assert set(started) == {"kafka", "minio"}
    # It started what it could and wrote their settings (reliability-hardening, defect 6).
    assert "prometheus failed" in proc.stderr
    stack_env = (state / "stack.env").read_text()
    assert f"OEL_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{env['OEL_STACK_KAFKA_PORT']}" in stack_env
    assert f"OEL_S3__ENDPOINT=127.0.0.1:{env['OEL_STACK_MINIO_PORT']}" in stack_env
    # `down` finds what `up` started even when the port variables are no longer set.
    plain = {k: v for k, v in env.items() if k not in PORT_VARS}
    assert oel(plain, "stack", "down").returncode == 0
    assert not any(_alive(p) for p in started.values())


def test_a_service_that_cannot_start_does_not_stop_the_others(private_stack):
    env, state = private_stack
    proc = up_with_port_taken(env, "OEL_STACK_KAFKA_PORT")
    assert proc.returncode == 1
    assert "kafka failed" in proc.stderr and "minio prometheus running" in proc.stderr, proc.stderr[-2000:]
    assert set(_pids(state)) == {"minio", "prometheus"}
    stack_env = (state / "stack.env").read_text()
    assert "OEL_KAFKA__BOOTSTRAP_SERVERS" not in stack_env
    assert f"OEL_S3__ENDPOINT=127.0.0.1:{env['OEL_STACK_MINIO_PORT']}" in stack_env and "OEL_S3__ACCESS_KEY=" in stack_env
