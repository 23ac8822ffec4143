"""The traps a new user fell into on the command line (issue 14): settings, names, errors, help.

Each case is the issue's own input, given to a real `meshnode` process.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.cli import build_parser
from tests.procs import NodeProcess, free_port

pytestmark = pytest.mark.slow

HOST = "127.0.18.40"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshnode.cli", *args], capture_output=True, text=True, timeout=90, cwd=cwd
    )


def one_error_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The run failed with exactly one line of explanation (log lines aside), no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "toml,key",
    [
        ('log_level = "verbose"\n', "log_level"),
        ("peer = 5\n", "peer"),
        ('mdns = "no"\n', "mdns"),
        ('insecure = "yes"\n', "insecure"),
        ('unknown_token_policy = "allow"\n', "unknown_token_policy"),
        ("unknown_token_max_wh = -5\n", "unknown_token_max_wh"),
        ("connector_max_power_kw = {1 = 22, x = 3}\n", "connector_max_power_kw"),
        ("colour = 1\n", "colour"),
    ],
)
def test_a_bad_config_file_names_the_bad_key(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml)
    result = cli("run", "--config", str(cfg), "--data-dir", str(tmp_path / "data"), "--insecure", "--no-mdns")
    line = one_error_line(result, "meshnode run:")
    assert result.returncode == 2 and key in line and str(cfg) in line, line
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


def test_node_id_is_kept_in_the_data_dir(tmp_path: Path) -> None:
    ports = (free_port(HOST), free_port(HOST))
    data = tmp_path / "lab"
    first = NodeProcess("bay-7", HOST, data, coap_port=ports[0], http_port=ports[1])
    first.start()
    assert first.get("/v1/status")["node_id"] == "bay-7"
    assert first.stop() == 0
    again = NodeProcess("bay-7", HOST, data, coap_port=ports[0], http_port=ports[1])
    again.start()  # NodeProcess passes --node-id; run it bare below
    again.stop()
    bare = subprocess.Popen(
        [sys.executable, "-m", "meshnode.cli", "run", "--data-dir", str(data), "--bind", HOST,
         "--coap-port", str(ports[0]), "--http-port", str(ports[1]), "--no-mdns", "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert bare.stdout is not None
        assert json.loads(bare.stdout.readline())["node_id"] == "bay-7"
    finally:
        bare.kill()
        bare.wait()
    renamed = cli("run", "--data-dir", str(data), "--node-id", "bay-8", "--insecure", "--no-mdns", "--bind", HOST)
    assert "belongs to node 'bay-7'" in one_error_line(renamed, "meshnode run:") and renamed.returncode == 2


def test_start_up_errors_are_one_line(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        run = ["run", "--insecure", "--no-mdns", "--data-dir", str(tmp_path / "d")]
        line = one_error_line(
            cli(*run, "--bind", HOST, "--http-port", str(port), "--coap-port", str(free_port(HOST))), "meshnode run:"
        )
        assert "in use" in line
        line = one_error_line(cli(*run, "--bind", "192.0.2.77", "--coap-port", "5683"), "meshnode run:")
        assert "192.0.2.77" in line
        line = one_error_line(cli("cloud", "--bind", HOST, "--port", str(port), "--db", "sqlite:///x.db",
                                  "--key", str(tmp_path / "k")), "meshnode cloud:")  # fmt: skip
        assert "in use" in line
    finally:
        busy.close()
    line = one_error_line(cli("cloud", "--db", "mysql://u:PW@h/db", "--key", str(tmp_path / "k")), "meshnode cloud:")
    assert "sqlite:///" in line and "PW" not in line
    line = one_error_line(cli("cloud", "--site", str(tmp_path / "nosite"), "--key", str(tmp_path / "k"),
                              "--db", f"sqlite:///{tmp_path}/c.db", "--bind", HOST), "meshnode cloud:")  # fmt: skip
    assert "site.pub" in line
    line = one_error_line(cli("enroll", "--node-id", "a", "--data-dir", str(tmp_path / "a"), "--site",
                              str(tmp_path / "nosite")), "meshnode enroll:")  # fmt: skip
    assert "site init" in line


def all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if "parse_known_args" in vars(sub):  # flags added when parsed (meshnode demo): add them
                    sub.parse_known_args([])
                yield from all_parsers(sub, (*path, name))


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, parser in all_parsers(build_parser()):
        for action in parser._actions:
            if action.help is None and not isinstance(action, argparse._SubParsersAction):
                missing.append(f"{' '.join(path) or 'meshnode'} {'/'.join(action.option_strings) or action.dest}")
        if path:
            assert parser.description or parser.format_help(), path
    assert missing == [], missing
    for path, _ in all_parsers(build_parser()):
        result = cli(*path, "--help")
        assert result.returncode == 0 and "usage: meshnode" in result.stdout, (path, result.stderr)


def test_cloud_pub_has_a_command_and_a_failed_enrolment_leaves_nothing(tmp_path: Path) -> None:
    import nacl.signing

    site = tmp_path / "site"
    assert cli("site", "init", "--site", str(site)).returncode == 0
    issuer = nacl.signing.SigningKey.generate().verify_key
    # What the new user did: the hex the cloud shows, pasted into the file.
    (site / "cloud.pub").write_text(bytes(issuer).hex())
    failed = cli("enroll", "--node-id", "bay-1", "--data-dir", str(tmp_path / "bay-1"), "--site", str(site))
    assert "cloud" in one_error_line(failed, "meshnode enroll:")
    assert not (tmp_path / "bay-1").exists()  # no half-written data dir
    fixed = cli("site", "cloud-key", "--site", str(site), "--issuer", bytes(issuer).hex())
    assert fixed.returncode == 0, fixed.stderr
    assert (site / "cloud.pub").read_bytes() == bytes(issuer)
    bad = cli("site", "cloud-key", "--site", str(site), "--issuer", "abcd")
    assert "64 hex" in one_error_line(bad, "meshnode site cloud-key:")
    done = cli("enroll", "--node-id", "bay-1", "--data-dir", str(tmp_path / "bay-1"), "--site", str(site))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bay-1" / "cloud.pub").read_bytes() == bytes(issuer)
    for name in ("api.token", "api-read.token"):  # made at enrolment, private
        assert (tmp_path / "bay-1" / name).stat().st_mode & 0o777 == 0o600


def test_secrets_are_redacted_from_every_line() -> None:
    import logging

    from meshnode.cli import _RedactingFormatter, redact

    for text, secret in [
        ("postgresql://meter:S3cret@db.example:5432/ledger", "S3cret"),
        ("cannot connect: host=db password=S3cret dbname=x", "S3cret"),
        ("Authorization: Bearer mn_S3cret_token", "mn_S3cret_token"),
        ("GET /v1/events?access_token=mn_S3cret&x=1", "mn_S3cret"),
    ]:
        assert secret not in redact(text) and "***" in redact(text)
    assert (
        redact("sqlite:///tmp/cloud.db and http://127.0.0.1:8700") == "sqlite:///tmp/cloud.db and http://127.0.0.1:8700"
    )
    try:
        raise RuntimeError("db postgresql://u:S3cret@h/d is down")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("postgresql://u:S3cret@h/d",), True)
        record.exc_info = sys.exc_info()
    assert "S3cret" not in _RedactingFormatter("%(message)s").format(record)
