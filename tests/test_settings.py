"""Settings from the environment: the group commit's waits (validated once, one clear error)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.settings import GROUP_COMMIT_LINGER_MS, GROUP_COMMIT_WAIT_MS, Settings
from ledger.errors import Invalid


def test_group_commit_waits_default_and_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("CITIZENCARD_GROUP_COMMIT_WAIT_MS", raising=False)
    monkeypatch.delenv("CITIZENCARD_GROUP_COMMIT_LINGER_MS", raising=False)
    s = Settings.from_env()
    assert (s.group_commit_wait_ms, s.group_commit_linger_ms) == (GROUP_COMMIT_WAIT_MS, GROUP_COMMIT_LINGER_MS)
    monkeypatch.setenv("CITIZENCARD_GROUP_COMMIT_WAIT_MS", "8")
    monkeypatch.setenv("CITIZENCARD_GROUP_COMMIT_LINGER_MS", "0.5")
    s = Settings.from_env()
    assert (s.group_commit_wait_ms, s.group_commit_linger_ms) == (8.0, 0.5)
    assert Settings(group_commit_wait_ms=0, group_commit_linger_ms=0).group_commit_wait_ms == 0


W, L = "group_commit_wait_ms (CITIZENCARD_GROUP_COMMIT_WAIT_MS)", "group_commit_linger_ms (CITIZENCARD_GROUP_COMMIT_LINGER_MS)"
NOT_MS = "is not a number of milliseconds (digits 0-9 with an optional decimal point)"


@pytest.mark.parametrize("wait, linger, message", [
    ("abc", "1", f"{W}: 'abc' {NOT_MS}"),
    ("5", "-1", f"{L}: '-1' {NOT_MS}"),
    ("1000", "1", f"{W}: 1000.0 must be 0 to 100 ms"),
    ("nan", "1", f"{W}: 'nan' {NOT_MS}"),
    ("inf", "1", f"{W}: 'inf' {NOT_MS}"),
    ("5_0", "1", f"{W}: '5_0' {NOT_MS}"),
    ("\u0663", "1", f"{W}: '\u0663' {NOT_MS}"),
    ("1e2", "1", f"{W}: '1e2' {NOT_MS}"),
    ("", "1", f"{W}: '' {NOT_MS}"),
    ("2", "3", f"{L} must not exceed {W}"),
])
def test_bad_group_commit_waits_are_refused_naming_the_setting(monkeypatch, wait, linger, message):
    monkeypatch.setenv("CITIZENCARD_GROUP_COMMIT_WAIT_MS", wait)
    monkeypatch.setenv("CITIZENCARD_GROUP_COMMIT_LINGER_MS", linger)
    with pytest.raises(Invalid) as exc:
        Settings.from_env()
    assert exc.value.code == "setting_invalid" and exc.value.detail == message


def test_the_server_refuses_a_bad_wait_in_one_line(tmp_path):
    env = dict(os.environ, CITIZENCARD_GROUP_COMMIT_WAIT_MS="soon",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}",
                           "--port", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: setting_invalid: {W}: 'soon' {NOT_MS}"
    verify = subprocess.run([sys.executable, "-m", "api.cli", "ledger", "verify", "--db",
                             f"sqlite:///{tmp_path / 'x.db'}"], env=env, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 2 and verify.stderr.strip() == done.stderr.strip()  # the same line everywhere


def test_a_missing_keys_file_names_commands_that_exist(tmp_path):
    """The hint names commands the CLI has (there is no ``citizencard keys``), which create the file."""
    import re

    import typer

    from api.cli import app

    db = tmp_path / "x.db"
    with pytest.raises(Invalid) as exc:
        Settings(db_url=f"sqlite:///{db}").load_keys()
    assert exc.value.code == "keys_missing"
    named = re.findall(r"`citizencard ([a-z ]+)`", exc.value.detail)
    assert named == ["day", "city"]
    commands = typer.main.get_command(app).commands
    assert all(name.split()[0] in commands for name in named)
    assert not Path(f"{db}.keys.json").exists()  # a server never invents secrets


def test_the_server_without_its_keys_file_says_so_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("CITIZENCARD_KEYS", None)
    done = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}",
                           "--port", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: keys_missing: {tmp_path / 'x.db'}.keys.json does not exist")
    assert "`citizencard day` or `citizencard city`" in line and "keys init" not in line


def _check_env_setting(monkeypatch, env: str, name: str, default, accepted: dict, refused: dict) -> None:
    """Setting ``name`` is ``default`` without ``env``, takes each of ``accepted`` (text -> value)
    from it, and refuses each of ``refused`` (text -> message) with ``setting_invalid``."""
    monkeypatch.delenv(env, raising=False)
    assert getattr(Settings.from_env(), name) == default
    for text, value in accepted.items():
        monkeypatch.setenv(env, text)
        assert getattr(Settings.from_env(), name) == value
    for text, message in refused.items():
        monkeypatch.setenv(env, text)
        with pytest.raises(Invalid) as exc:
            Settings.from_env()
        assert exc.value.code == "setting_invalid" and exc.value.detail == message


def test_the_terminal_cache_defaults_to_5_s_comes_from_the_environment_and_is_bounded(monkeypatch):
    from api.settings import TERMINAL_CACHE_S

    label = "terminal_cache_s (CITIZENCARD_TERMINAL_CACHE_S)"
    _check_env_setting(monkeypatch, "CITIZENCARD_TERMINAL_CACHE_S", "terminal_cache_s", 5.0, {"0.5": 0.5}, {
        "61": f"{label}: 61.0 must be 0 to 60 s",
        "-1": f"{label}: '-1' is not a number of seconds (digits 0-9 with an optional decimal point)",
        "5s": f"{label}: '5s' is not a number of seconds (digits 0-9 with an optional decimal point)"})
    assert TERMINAL_CACHE_S == 5.0 and Settings(terminal_cache_s=0).terminal_cache_s == 0


def test_the_db_pool_size_defaults_to_16_comes_from_the_environment_and_is_bounded(monkeypatch):
    from ledger.db import POOL_SIZE

    label = "db_pool_size (CITIZENCARD_DB_POOL_SIZE)"
    _check_env_setting(monkeypatch, "CITIZENCARD_DB_POOL_SIZE", "db_pool_size", 16, {" 40 ": 40}, {
        "0": f"{label}: 0 must be 1 to 500 connections",
        "501": f"{label}: 501 must be 1 to 500 connections",
        "8.5": f"{label}: '8.5' is not a whole number of connections",
        "-1": f"{label}: '-1' is not a whole number of connections",
        "many": f"{label}: 'many' is not a whole number of connections"})
    assert POOL_SIZE == 16 and Settings(db_pool_size=1).db_pool_size == 1
    with pytest.raises(Invalid):
        Settings(db_pool_size=True)
