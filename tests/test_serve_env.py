"""`loraforge api` reads LLaMA-Factory's API_HOST, API_PORT, API_KEY and API_MODEL_NAME; flags win."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from loraforge.errors import ConfigError
from loraforge.serve.api import ServerSettings, is_loopback, server_settings


def test_defaults_bind_loopback_without_key():
    assert server_settings(environ={}) == ServerSettings("127.0.0.1", 8000, None, None)


def test_environment_is_read():
    env = {"API_HOST": "::1", "API_PORT": "8123", "API_KEY": "sk-env", "API_MODEL_NAME": "my-model"}
    assert server_settings(environ=env) == ServerSettings("::1", 8123, "sk-env", "my-model")


def test_flags_win_over_environment():
    env = {"API_HOST": "0.0.0.0", "API_PORT": "8123", "API_KEY": "sk-env", "API_MODEL_NAME": "env-model"}
    got = server_settings(host="127.0.0.1", port=9000, api_key="sk-flag", model_name="flag-model", environ=env)
    assert got == ServerSettings("127.0.0.1", 9000, "sk-flag", "flag-model")


def test_loraforge_key_wins_over_api_key_and_blank_values_are_unset():
    env = {"API_KEY": "sk-lf", "LORAFORGE_API_KEY": "sk-ours", "API_HOST": " ", "API_PORT": ""}
    assert server_settings(environ=env) == ServerSettings("127.0.0.1", 8000, "sk-ours", None)


@pytest.mark.parametrize("value", ["http", "80.5", "0", "70000"])
def test_bad_port_is_an_error_naming_the_variable(value):
    with pytest.raises(ConfigError, match="API_PORT"):
        server_settings(environ={"API_PORT": value})


def test_exposed_without_key_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="loraforge.serve.api"):
        server_settings(environ={"API_HOST": "0.0.0.0"})
    assert "API_HOST=0.0.0.0 exposes the server to other machines and no API key is set" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loraforge.serve.api"):
        server_settings(environ={"API_HOST": "0.0.0.0", "API_KEY": "sk"})
        server_settings(environ={"API_HOST": "localhost"})
        server_settings(environ={})
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="loraforge.serve.api"):
        server_settings(host="192.168.1.5", environ={})
    assert "--host=192.168.1.5 exposes" in caplog.text


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("myhost.example")


def test_cli_bad_port_fails_before_loading_the_model(monkeypatch, capsys):
    from loraforge.cli import main

    monkeypatch.setenv("API_PORT", "eighty")
    assert main(["api", "model_name_or_path=/does/not/exist"]) == 2
    assert "API_PORT='eighty' is not a port number" in capsys.readouterr().err


def test_cli_serves_with_environment(tiny_qwen3_path, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import json
    import os
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "API_HOST": "127.0.0.1",
           "API_PORT": str(port), "API_KEY": "lf-key", "API_MODEL_NAME": "forge-test"}
    env.pop("LORAFORGE_API_KEY", None)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "api", f"model_name_or_path={tiny_qwen3_path}",
                                 "template=qwen3", "max_new_tokens=2"], stdout=log, stderr=subprocess.STDOUT, env=env)

    def get(path: str, key: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if get("/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, log_path.read_text()[-2000:]
        status, body = get("/v1/models", "lf-key")
        assert status == 200 and body["data"][0]["id"] == "forge-test"
        assert get("/v1/models")[0] == 401
        assert f"serving forge-test at http://127.0.0.1:{port}/v1 (bearer key required)" in log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
