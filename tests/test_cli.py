"""The command line: --help/--version, settings from TOML and flags, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshnode.cli import ConfigError, build_parser, resolve_run_settings


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshnode.cli", *args], capture_output=True, text=True, timeout=60)


def test_version_and_help():
    from meshnode import __version__

    assert run_cli("--version").stdout.strip() == f"meshnode {__version__}"
    out = run_cli("run", "--help").stdout
    for flag in (
        "--node-id",
        "--data-dir",
        "--bind",
        "--coap-port",
        "--http-port",
        "--peer",
        "--no-mdns",
        "--config",
        "--cloud-url",
    ):
        assert flag in out
    sim = subprocess.run([sys.executable, "-m", "sim.cli", "--version"], capture_output=True, text=True)
    assert sim.stdout.strip().startswith("meshsim ")


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('node_id = "bay-7"\ncoap_port = 6000\npeers = ["10.0.0.2:5683"]\nmdns = false\n')
    args = build_parser().parse_args(["run", "--config", str(cfg), "--coap-port", "6001", "--peer", "10.0.0.3:5683"])
    settings = resolve_run_settings(args)
    assert settings["node_id"] == "bay-7"
    assert settings["coap_port"] == 6001  # the flag wins over the file
    assert settings["peer"] == ["10.0.0.3:5683"]
    assert settings["no_mdns"] is True
    assert settings["http_port"] == 8080


@pytest.mark.parametrize(
    "toml,flags,message",
    [
        ("colour = 1\n", [], "unknown settings"),
        ("coap_port = 70000\n", [], "port number"),
        ("", ["--peer", "nohost"], "HOST:PORT"),
        ("this is = not toml", [], "not valid TOML"),
        ("", ["--cloud-url", "ftp://x"], "http:// or https://"),
        ("retention = -1\n", [], "positive number"),
    ],
)
def test_bad_settings_say_what_to_change(tmp_path, toml, flags, message):
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml)
    args = build_parser().parse_args(["run", "--config", str(cfg), *flags])
    with pytest.raises(ConfigError, match=message):
        resolve_run_settings(args)


def test_missing_config_file_is_reported(tmp_path):
    result = run_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "cannot read --config" in result.stderr


def test_status_of_a_node_that_is_not_running():
    result = run_cli("status", "--http", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "Is the node running" in result.stderr


def test_cloud_with_an_incomplete_site_folder_says_what_to_copy(tmp_path):
    """The cloud's copy of a site folder needs site.pub and site.toml: each missing file is
    one line that names it, and nothing starts (no database is created)."""
    site = tmp_path / "site"
    site.mkdir()
    db = tmp_path / "ledger.db"
    missing_pub = run_cli("cloud", "--site", str(site), "--port", "0", "--db", str(db))
    assert missing_pub.returncode == 1
    assert "site.pub" in missing_pub.stderr and "Traceback" not in missing_pub.stderr
    (site / "site.pub").write_bytes(bytes(range(32)))
    missing_toml = run_cli("cloud", "--site", str(site), "--port", "0", "--db", str(db))
    assert missing_toml.returncode == 1
    last = missing_toml.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"meshnode cloud: {site / 'site.toml'} not found: copy the site's site.toml into {site} (meshnode site init writes it)"
    )
    (site / "site.toml").write_text("created = 1.0\n")
    no_name = run_cli("cloud", "--site", str(site), "--port", "0", "--db", str(db))
    assert no_name.returncode == 1 and "has no valid name" in no_name.stderr
    assert not db.exists()
