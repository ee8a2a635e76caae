"""``fedsim run --superlink`` / ``fedsim supernodes`` without a SuperLink: the
connection Flower is given, and bad options refused before anything is written."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from fedsim.core.errors import ConfigError
from fedsim.engine.host import cli
from fedsim.engine.host.remote import Connection, _json_reply
from fedsim.engine.host.superlink import SimulationError, flower_home


def test_connection_tables_follow_flowers_config_keys(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    assert Connection("10.0.0.5:9093", insecure=True).toml() == {
        "address": "10.0.0.5:9093",
        "insecure": True,
    }
    assert Connection("superlink.example.org:9093", ca).toml() == {
        "address": "superlink.example.org:9093",
        "root-certificates": str(ca.resolve()),
    }
    # neither: TLS verified with the system's trust store (Flower's default)
    assert Connection("[::1]:9093").toml() == {"address": "[::1]:9093"}
    home, _ = flower_home(Connection("10.0.0.5:9093", ca).toml())
    written = tomllib.loads((home / "config.toml").read_text())
    shutil.rmtree(home)
    assert written["superlink"]["default"] == "fedsim"
    assert written["superlink"]["fedsim"]["root-certificates"] == str(ca.resolve())


@pytest.mark.parametrize(
    ("address", "flag"),
    [
        ("127.0.0.1", "--superlink"),
        ("http://127.0.0.1:9093", "--superlink"),
        ("127.0.0.1:99999", "--superlink"),
        ("127.0.0.1:0", "--superlink"),
    ],
)
def test_bad_addresses_are_refused(address: str, flag: str) -> None:
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        Connection(address, insecure=True)


def test_missing_root_certificates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^--root-certificates: .* is not a file"):
        Connection("127.0.0.1:9093", tmp_path / "missing.crt")


@pytest.mark.parametrize(
    "args",
    [
        ["--insecure"],
        ["--remote-out", "/work/runs"],
        ["--superlink", "nohost"],
        ["--superlink", "127.0.0.1:9093", "--root-certificates", "/nonexistent.crt"],
    ],
)
def test_cli_refuses_bad_remote_options_and_writes_nothing(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert cli.main(["run", *args, "--out", str(out)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedsim: error: --"), err
    assert not out.exists()


def test_flwr_json_replies_are_read_or_reported() -> None:
    def done(stdout: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], code, stdout, "")

    listed = 'Using SuperLink: fedsim\n{\n  "success": true,\n  "nodes": []\n}\n'
    assert _json_reply(done(listed), "ls") == {"success": True, "nodes": []}
    refused = '{\n  "success": false,\n  "error-message": "a\\n\\nunavailable."\n}'
    with pytest.raises(SimulationError, match="^ls: unavailable.$"):
        _json_reply(done(refused), "ls")
    with pytest.raises(SimulationError, match=r"ls failed \(exit 1\): boom"):
        _json_reply(done("boom", 1), "ls")
