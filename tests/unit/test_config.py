"""Settings: typed, defaulted, documented; unknown keys are errors naming file and key."""

import subprocess
import sys

import pytest

from filterd import config


def write(tmp_path, text):
    path = tmp_path / "filterd.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FILTERD_CONFIG", raising=False)
    monkeypatch.delenv("FILTERD_STATE_DIR", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    settings = config.load()
    assert settings.path is None
    assert settings.milter.listen == "inet:8890@127.0.0.1"
    assert settings.smtp.listen == "127.0.0.1:10024"
    assert settings.smtp.reinject == "127.0.0.1:10025"
    assert str(settings.state_dir) == "/var/lib/filterd"


def test_values_and_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("FILTERD_STATE_DIR", raising=False)
    path = write(tmp_path, '[smtp]\nlisten = "127.0.0.1:2000"\n[scan]\ndeadline = 5\n')
    settings = config.load(path)
    assert settings.smtp.listen == "127.0.0.1:2000"
    assert settings.scan.deadline == 5.0
    assert settings.source("smtp.listen") == str(path)
    assert settings.source("milter.listen") == "default"
    shown = config.render_toml(settings, non_default=True)
    assert 'listen = "127.0.0.1:2000"' in shown and "milter" not in shown


@pytest.mark.parametrize("text, key, problem", [
    ("[smtp]\nlisen = 'x'\n", "smtp.lisen", "unknown setting"),
    ("[nosuch]\na = 1\n", "nosuch", "unknown section"),
    ("[smtp]\nlisten = 'nohost'\n", "smtp.listen", "is not HOST:PORT"),
    ("[scan]\ndeadline = 'soon'\n", "scan.deadline", "expected a number"),
    ("[scan]\ndeadline = 0\n", "scan.deadline", "must be at least"),
    ("[milter]\nenabled = 1\n", "milter.enabled", "expected true or false"),
    ("[log]\nformat = 'xml'\n", "log.format", "expected one of"),
    ("[scan]\nmynetworks = ['10.0.0.0/33']\n", "scan.mynetworks", "is not an IP network"),
    ("[smtp\n", "(syntax)", ""),
])
def test_errors_name_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.source == str(path)
    assert err.value.key == key
    assert problem in err.value.problem


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_state_dir_precedence(tmp_path, monkeypatch):
    path = write(tmp_path, '[daemon]\nstate_dir = "/from/file"\n')
    monkeypatch.setenv("FILTERD_STATE_DIR", "/from/env")
    assert str(config.load(path).state_dir) == "/from/env"
    assert str(config.load(path, state_dir="/from/flag").state_dir) == "/from/flag"
    s = config.load(path, state_dir="/x")
    assert s.quarantine_dir.as_posix() == "/x/quarantine"
    assert s.control_socket.as_posix() == "/x/control.sock"


def test_every_setting_is_documented():
    for setting in config.SETTINGS:
        assert len(setting.doc) > 15 and setting.doc.rstrip().endswith((".", ")")), setting.key
        config.coerce(setting, setting.default)  # every default is valid


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "filterd", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_config_check_cli(tmp_path):
    good = write(tmp_path, '[smtp]\nlisten = "127.0.0.1:2000"\n')
    result = run_cli("--config", str(good), "config", "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: settings from")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nlisen = 1\n")
    result = run_cli("--config", str(bad), "config", "check")
    assert result.returncode == 1
    assert f"{bad}: smtp.lisen: unknown setting" in result.stderr


def test_config_show_cli(tmp_path):
    good = write(tmp_path, '[scan]\ndeadline = 7.5\n')
    result = run_cli("--config", str(good), "config", "show", "--non-default")
    assert result.returncode == 0
    assert "[scan]" in result.stdout and "deadline = 7.5" in result.stdout
    assert "[milter]" not in result.stdout
