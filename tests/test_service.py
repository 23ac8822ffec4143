"""The node as a systemd service: the packaged unit, its command line, and the wheel that carries it.

There is no systemd running as PID 1 where the tests run, so the unit is checked the two ways that
need none: `systemd-analyze verify` parses every setting (an unknown or malformed one is reported),
and the exact ExecStart command line of the unit is run as a real process, against an enrolled
data dir and the packaged example config, until it is ready and then stopped with the unit's
KillSignal. The wheel test builds the wheel and imports the node from it alone.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from meshnode import service

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.9.1"  # this file's loopback address


def _settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of the [Service] section, repeated keys kept in order."""
    seen: dict[str, list[str]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            seen.setdefault(key, []).append(value)
    return seen


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)


def test_the_packaged_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "meshnode.service"
    unit.write_text(service.unit())
    result = _verify(unit)
    assert result.returncode == 0, result.stderr
    # verify exits 0 on settings it ignores, but reports them: any line about our unit is a defect.
    assert str(unit) not in result.stderr + result.stdout, result.stderr


def test_verify_reports_a_bad_setting(tmp_path: Path) -> None:
    """The check above can fail: a malformed hardening value is reported."""
    unit = tmp_path / "meshnode.service"
    unit.write_text(service.unit().replace("ProtectSystem=strict", "ProtectSystem=strictest"))
    result = _verify(unit)
    assert f"{unit}:" in result.stderr and "strictest" in result.stderr


def test_the_unit_is_hardened_and_restarts() -> None:
    s = _settings(service.unit())
    assert s["User"] == ["meshnode"] and s["Group"] == ["meshnode"]
    assert s["StateDirectory"] == ["meshnode"] and s["StateDirectoryMode"] == ["0700"]
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"]
    assert s["NoNewPrivileges"] == ["yes"] and s["CapabilityBoundingSet"] == [""]
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"]
    argv = shlex.split(s["ExecStart"][0])
    assert argv[0] == service.meshnode_executable() and Path(argv[0]).exists()
    assert argv[1:] == ["run", "--config", "/etc/meshnode/meshnode.toml", "--data-dir", "/var/lib/meshnode"]
    sysusers = service.packaged("meshnode.sysusers").split("\n")
    assert any(line.startswith("u meshnode ") for line in sysusers)


def test_the_cli_prints_each_file(tmp_path: Path) -> None:
    for name, marker in (("unit", "[Service]"), ("sysusers", "u meshnode"), ("config", "bind =")):
        out = subprocess.run(
            [sys.executable, "-m", "meshnode.service", name], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert marker in out
    bad = subprocess.run([sys.executable, "-m", "meshnode.service", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.slow
def test_the_units_command_line_runs_an_enrolled_node(tmp_path: Path) -> None:
    """ExecStart as written (paths moved into tmp) starts an enrolled node from the example config."""
    site, data, etc = tmp_path / "site", tmp_path / "state", tmp_path / "etc"
    etc.mkdir()
    cli = [sys.executable, "-m", "meshnode.cli"]
    subprocess.run([*cli, "site", "init", "--site", str(site)], check=True, capture_output=True, timeout=120)
    subprocess.run(
        [*cli, "enroll", "--node-id", "charger-1", "--data-dir", str(data), "--site", str(site)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    config = (
        service.packaged("meshnode.toml")
        .replace('bind = "10.0.0.2"', f'bind = "{HOST}"')
        .replace("coap_port = 5683", "coap_port = 25683")
        .replace("http_port = 8080", "http_port = 28080")
    )
    assert f'bind = "{HOST}"' in config and "coap_port = 25683" in config  # the example's keys are real
    (etc / "meshnode.toml").write_text(config + "mdns = false\n")
    exec_start = _settings(service.unit())["ExecStart"][0]
    exec_start = exec_start.replace("/etc/meshnode/meshnode.toml", str(etc / "meshnode.toml"))
    exec_start = exec_start.replace("/var/lib/meshnode", str(data))
    proc = subprocess.Popen(shlex.split(exec_start), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert '"ready": true' in line, proc.stderr.read() if proc.poll() is not None else line
        assert '"enrolled": true' in line and f"{HOST}:25683" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_wheel_carries_the_whole_node(tmp_path: Path) -> None:
    """Built like docs/service.md says, the wheel alone holds every subpackage and the unit."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("meshnode-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    names = {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*.py")}
    for package in ("meshnode", "meshnode/core", "meshnode/services", "crdt", "crdt/store", "uplink", "sim"):
        assert f"{package}/__init__.py" in names, package
    assert (unpacked / "meshnode/data/meshnode.service").exists()
    # Import the node from the unpacked wheel only (PYTHONPATH comes before the editable install).
    env = dict(os.environ, PYTHONPATH=str(unpacked))
    probe = (
        "import meshnode, meshnode.cli, meshnode.core, meshnode.services, meshnode.service, crdt, uplink;"
        "print(meshnode.__file__); print(meshnode.service.unit('/x/meshnode'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith(str(unpacked)), out.stdout
    assert "ExecStart=/x/meshnode run" in out.stdout
