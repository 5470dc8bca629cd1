"""The `oel` command: help at every level, and the smoke run against the real stack."""

from __future__ import annotations

import ast
import subprocess
import sys

import click
from click.testing import CliRunner

from oel.cli import cli


def _subcommand(group: click.Group, name: str) -> click.Command:
    """A group's subcommand, resolved as click does (the root group imports its commands lazily)."""
    return group.get_command(click.Context(group), name)


def _all_commands(group: click.Group, path=()):
    for name in group.list_commands(click.Context(group)):
        cmd = _subcommand(group, name)
        yield (*path, name)
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*path, name))


def test_help_at_every_level():
    runner = CliRunner()
    paths = [(), *_all_commands(cli)]
    assert ("stack", "up") in paths and ("topics", "create") in paths
    for path in paths:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        cmd = cli
        for name in path:
            cmd = _subcommand(cmd, name)
        assert cmd.help, f"`oel {' '.join(path)}` has no help text"


def test_smoke_against_the_real_stack(kafka, s3_store):
    result = CliRunner().invoke(cli, ["smoke"])
    assert result.exit_code == 0, result.output
    assert "read it back" in result.output and "identical" in result.output
    assert "re-wrote (no-op)" in result.output


def _loaded_after(imports: str, roots: tuple[str, ...]) -> list[str]:
    """The modules under ``roots`` that a fresh interpreter has loaded after ``import <imports>``."""
    code = f"import sys, {imports}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout)


def test_the_command_imports_no_service_package_until_a_command_needs_it():
    assert _loaded_after("oel.cli", ("learner", "processors", "producers", "evaluation", "reference", "recipes", "gateway")) == []


def test_core_imports_no_kafka_or_faust():
    core = "oel.settings, oel.schemas, oel.store, oel.topics, oel.versions, oel.episodes, oel.model.backend"
    assert _loaded_after(core, ("confluent_kafka", "faust", "aiokafka", "mode")) == []


def test_a_service_that_is_down_is_one_line_naming_it_not_a_traceback(tmp_path):
    """reliability-hardening, defect 6: ports where nothing listens stand for a store and a broker that are down."""
    import os

    from test_processor import free_port

    store, broker = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "OEL_S3__ENDPOINT": store,
        "OEL_KAFKA__BOOTSTRAP_SERVERS": broker,
        "OEL_S3__ACCESS_KEY": "nobody",
        "OEL_S3__SECRET_KEY": "nothing-here",
    }
    for args, endpoint in ((["models", "list"], store), (["smoke"], broker)):
        proc = subprocess.run([sys.executable, "-m", "oel.cli", *args], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and endpoint in proc.stderr, (args, proc.stderr[-2000:])
        assert [line for line in proc.stderr.splitlines() if line.startswith("Error: ")], proc.stderr[-2000:]
