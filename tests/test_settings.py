"""Settings: sources, precedence and the errors a bad value produces."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from oel.cli import render_settings_table
from oel.settings import Settings, SettingsError, load_settings, settings_reference

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No OEL_* variables from the outside, and a state dir without stack.env."""
    import os

    for name in list(os.environ):
        if name.startswith("OEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OEL_PATHS__STATE_DIR", str(tmp_path / "state"))
    return monkeypatch


def test_defaults_are_loopback_and_valid(clean_env):
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.s3.endpoint == "127.0.0.1:9000"
    assert s.topics.model_versions == "oel.model-versions"
    assert s.s3.access_key is None


def test_environment_overrides_nested_fields(clean_env):
    clean_env.setenv("OEL_KAFKA__BOOTSTRAP_SERVERS", "10.0.0.1:9092, 10.0.0.2:9092")
    clean_env.setenv("OEL_TOPICS__TRAJECTORIES_PARTITIONS", "12")
    clean_env.setenv("OEL_S3__SECRET_KEY", "s3cr3t")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "10.0.0.1:9092,10.0.0.2:9092"
    assert s.topics.trajectories_partitions == 12
    assert s.s3.secret_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in s.model_dump_json()


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("OEL_KAFKA__BOOTSTRAP_SERVERS", "not a broker", "host:port"),
        ("OEL_TOPICS__TRAJECTORIES_PARTITIONS", "zero", "valid integer"),
        ("OEL_TOPICS__TRAJECTORIES_PARTITIONS", "0", "greater than or equal to 1"),
        ("OEL_S3__ENDPOINT", "http://minio:9000", "without a scheme"),
        ("OEL_S3__BUCKET", "Bad_Bucket", "S3 bucket name"),
        ("OEL_MODEL__BACKEND", "tensorrt", "'transformers' or 'vllm'"),
        ("OEL_MODEL__PATH", "/nonexistent/model", "config.json"),
        ("OEL_MODEL__DEVICE", "gpu", "should match pattern"),
        ("OEL_MODEL__DEVICE", "cuda:x", "should match pattern"),
        ("OEL_KAFKA__SECURITY_PROTOCOL", "SASL_SSL", "OEL_KAFKA__SASL_MECHANISM"),
    ],
)
def test_bad_value_names_the_setting(clean_env, var, value, expected):
    clean_env.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    prefix = "OEL_KAFKA" if var == "OEL_KAFKA__SECURITY_PROTOCOL" else var
    assert prefix in message
    assert expected in message


def test_config_file_then_stack_env_then_defaults(clean_env, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "stack.env").write_text("OEL_S3__ENDPOINT=127.0.0.1:9900\nOEL_S3__ACCESS_KEY=from-stack\n")
    config = tmp_path / "oel.toml"
    config.write_text('[s3]\naccess_key = "from-file"\n[learner]\nsteps = 7\n')
    clean_env.setenv("OEL_CONFIG_FILE", str(config))
    clean_env.setenv("OEL_LEARNER__STEPS", "9")
    s = load_settings()
    assert s.learner.steps == 9  # environment beats the file
    assert s.s3.access_key == "from-file"  # the file beats stack.env
    assert s.s3.endpoint == "127.0.0.1:9900"  # stack.env beats the defaults


def test_config_file_errors(clean_env, tmp_path):
    clean_env.setenv("OEL_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match="OEL_CONFIG_FILE"):
        load_settings()
    config = tmp_path / "typo.toml"
    config.write_text("[learner]\nstepz = 3\n")
    clean_env.setenv("OEL_CONFIG_FILE", str(config))
    with pytest.raises(SettingsError, match="OEL_LEARNER__STEPZ"):
        load_settings()


def test_cli_fails_at_startup_naming_the_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OEL_TOPICS__EXPERIENCE_PARTITIONS": "-3"}
    proc = subprocess.run([sys.executable, "-m", "oel.cli", "config", "show"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "OEL_TOPICS__EXPERIENCE_PARTITIONS" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reference_covers_every_field_and_readme_is_current():
    names = {row[0] for row in settings_reference()}
    expected = {
        f"OEL_{section.upper()}__{field.upper()}"
        for section, info in Settings.model_fields.items()
        for field in info.annotation.model_fields
    }
    assert names == expected
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert block, "README.md has no generated settings block"
    assert block.group(1).strip() == render_settings_table().strip(), "README settings table is stale: paste `oel config docs`"
