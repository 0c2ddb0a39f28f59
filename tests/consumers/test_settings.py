import sys
from pathlib import Path

import pytest

from streamlstm import ConfigError
from streamlstm.consumers.settings import parse_serve_args
from streamlstm.errors import DependencyError

REQUIRED = [
    "--model",
    "m",
    "--bootstrap-servers",
    "b:9092",
    "--input-topic",
    "in",
    "--output-topic",
    "out",
]


def test_flag_beats_env_beats_toml(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text(
        'max_records = 10\nlinger_ms = 7\ngroup-id = "from-toml"\ncreate_topics = true\n'
    )
    env = {"STREAMLSTM_MAX_RECORDS": "20", "STREAMLSTM_GROUP_ID": "from-env"}
    cfg = parse_serve_args([*REQUIRED, "--config", str(toml), "--max-records", "30"], env)
    assert cfg.max_records == 30
    assert cfg.group_id == "from-env"
    assert cfg.linger_ms == 7
    assert cfg.create_topics is True
    assert cfg.dlq_topic == "in-dlq"


def test_everything_from_the_environment() -> None:
    env = {
        "STREAMLSTM_MODEL": "m",
        "STREAMLSTM_BOOTSTRAP_SERVERS": "b:1",
        "STREAMLSTM_INPUT_TOPIC": "i",
        "STREAMLSTM_OUTPUT_TOPIC": "o",
        "STREAMLSTM_IDLE_TTL_S": "60",
        "STREAMLSTM_CREATE_TOPICS": "true",
    }
    cfg = parse_serve_args([], env)
    assert cfg.idle_ttl_s == 60.0 and cfg.create_topics is True


def test_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="--output-topic"):
        parse_serve_args(REQUIRED[:6], {})
    with pytest.raises(ConfigError, match="max_records: 'many' is not a valid int"):
        parse_serve_args([*REQUIRED, "--max-records", "many"], {})
    with pytest.raises(ConfigError, match="must differ"):
        parse_serve_args([*REQUIRED, "--dlq-topic", "out"], {})


def test_password_never_in_repr() -> None:
    cfg = parse_serve_args([*REQUIRED, "--sasl-plain-password", "hunter2"], {})
    assert cfg.sasl_plain_password == "hunter2"
    assert "hunter2" not in repr(cfg)


def test_latency_target_from_flag_env_or_toml_and_off_by_default(tmp_path: Path) -> None:
    assert parse_serve_args(REQUIRED, {}).latency_target_ms is None
    toml = tmp_path / "serve.toml"
    toml.write_text("latency_target_ms = 15\n")
    assert parse_serve_args([*REQUIRED, "--config", str(toml)], {}).latency_target_ms == 15.0
    env = {"STREAMLSTM_LATENCY_TARGET_MS": "12.5"}
    assert parse_serve_args(REQUIRED, env).latency_target_ms == 12.5
    cfg = parse_serve_args([*REQUIRED, "--latency-target-ms", "8"], env)
    assert cfg.latency_target_ms == 8.0
    for bad in ("0", "-3", "nan"):
        with pytest.raises(ConfigError, match="latency_target_ms: must be positive"):
            parse_serve_args([*REQUIRED, "--latency-target-ms", bad], {})
    with pytest.raises(ConfigError, match="latency_target_ms: 'soon' is not a valid float"):
        parse_serve_args([*REQUIRED, "--latency-target-ms", "soon"], {})


def test_a_shadow_model_needs_its_own_topic() -> None:
    with pytest.raises(ConfigError, match="shadow_topic: required with shadow_model"):
        parse_serve_args([*REQUIRED, "--shadow-model", "candidate"], {})
    with pytest.raises(ConfigError, match="shadow_topic: required with shadow_model"):
        parse_serve_args([*REQUIRED, "--shadow-topic", "cmp"], {})
    with pytest.raises(ConfigError, match="must differ"):
        parse_serve_args([*REQUIRED, "--shadow-model", "c", "--shadow-topic", "out"], {})
    cfg = parse_serve_args([*REQUIRED, "--shadow-model", "c", "--shadow-topic", "cmp"], {})
    assert (cfg.shadow_model, cfg.shadow_topic) == ("c", "cmp")


def test_a_state_dir_needs_the_cold_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_serve_args([*REQUIRED, "--state-dir", "/tmp/x", "--max-disk-streams", "5"], {})
    assert (cfg.state_dir, cfg.max_disk_streams, cfg.state_cleanup_delay_s) == ("/tmp/x", 5, 600)
    assert parse_serve_args(REQUIRED, {}).state_dir is None
    for bad in ("-1", "nan"):
        with pytest.raises(ConfigError, match="state_cleanup_delay_s: must be zero or more"):
            parse_serve_args([*REQUIRED, "--state-cleanup-delay-s", bad], {})
    monkeypatch.setitem(sys.modules, "rocksdict", None)  # as if not installed
    with pytest.raises(DependencyError, match=r"--state-dir .*pip install 'streamlstm\[cold\]'"):
        parse_serve_args([*REQUIRED, "--state-dir", "/tmp/x"], {})
