"""The server's configuration: defaults, file, environment and flags, in that order."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from earshot.core.errors import ConfigError
from earshot.service.config import Config, add_config_flags, config_from_args, load_config


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.host == "127.0.0.1" and cfg.port == 8000


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "earshot.toml"
    path.write_text('[earshot]\nport = 9000\nmax_streams = 8\nlanguage = "de"\n')
    cfg = load_config(
        file=path,
        env={"EARSHOT_MAX_STREAMS": "12", "EARSHOT_ALLOW_DOWNLOAD": "yes"},
        overrides={"language": "fr", "port": None},
    )
    assert cfg.port == 9000  # file
    assert cfg.max_streams == 12  # environment beats file
    assert cfg.allow_download is True
    assert cfg.language == "fr"  # flag beats both


def test_flags_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EARSHOT_CONFIG", raising=False)
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--max-batch", "2", "--interim-step-s", "0.5", "--no-allow-download"])
    cfg = config_from_args(args)
    assert cfg.max_batch == 2 and cfg.interim_step_s == 0.5 and cfg.allow_download is False


def test_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "field", "words"),
    [
        ({"EARSHOT_PORT": "eighty"}, "port", "must be of type int"),
        ({"EARSHOT_PORT": "70000"}, "port", "from 0 to 65535"),
        ({"EARSHOT_MAX_STREAMS": "0"}, "max_streams", "at least 1"),
        ({"EARSHOT_DEVICE": "tpu"}, "device", "auto, cpu or cuda"),
        ({"EARSHOT_LAG_LIMIT_S": "2", "EARSHOT_LAG_WARNING_S": "5"}, "lag_limit_s", "lag_warning"),
        ({"EARSHOT_ALLOW_DOWNLOAD": "perhaps"}, "allow_download", "must be of type bool"),
        ({"EARSHOT_MAX_SESSION_S": "0"}, "max_session_s", "above 0"),
        ({"EARSHOT_MAX_UPLOAD_BYTES": "10"}, "max_upload_bytes", "at least 1024"),
        ({"EARSHOT_MAX_AUDIO_S": "-1"}, "max_audio_s", "above 0"),
        ({"EARSHOT_LOG_FORMAT": "xml"}, "log_format", "json or text"),
        ({"EARSHOT_LOG_LEVEL": "loud"}, "log_level", "debug, info"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        load_config(env=env)
    assert info.value.details["field"] == field
    assert info.value.code == "invalid_config"


def test_unknown_key_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_stream = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_stream'"):
        load_config(file=path, env={})


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("port = = 3\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(file=path, env={})
