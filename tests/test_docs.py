"""docs/running.md and docs/deployment.md work as written (issue 14, traps 1 and 2).

Every ```sh block of a page runs, in order, in one bash shell, as a new user would
paste them, in a fresh folder, with `meshnode` found on PATH as the pages say. The only
changes are substitutions a shared test machine needs, listed per page below: addresses
(the pages' may be taken, or not exist here), folders (/tmp/, /var/lib/), the PostgreSQL
server (a real one, tests/pg.py). deployment.md's serving commands (`meshnode cloud`,
`meshnode run`) run in the background, as in a second terminal, until their ready line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parent.parent / "docs"
ADDRESSES = {"127.0.0.2": "127.0.18.71", "127.0.0.3": "127.0.18.72", "127.0.0.4": "127.0.18.73"}


def shell_blocks(page: Path) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def as_run_here(script: str, tmp: Path) -> str:
    for old, new in ADDRESSES.items():
        script = script.replace(old, new)
    return script.replace("/tmp/", f"{tmp}/")


def test_running_md_quick_start_runs_as_written(tmp_path: Path) -> None:
    blocks = shell_blocks(DOCS / "running.md")
    assert len(blocks) >= 6 and any("meshnode enroll" in b for b in blocks)
    script = "set -euo pipefail\n" + "\n".join(as_run_here(b, tmp_path) for b in blocks)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        out = ""
    finally:
        if proc.poll() is None or proc.returncode != 0:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the shell and the nodes it started
            except ProcessLookupError:
                pass
            proc.wait()
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
    assert proc.returncode == 0, f"the quick start failed:\n{out}{logs}"
    # What the page promises: the session billed 200 Wh, nothing else.
    assert '"energy_wh":200' in out and '"state":"reconciled"' in out, out
    assert '"ready": true' in out and "node charger-2" in out
    assert "Traceback" not in logs, logs


DEPLOY_CLOUD, DEPLOY_NODE = "127.0.13.8", "127.0.13.7"


def self_signed(tmp: Path) -> None:
    """cloud.pem / cloud-key.pem for the cloud's address: the operator's certificate, from their CA."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-keyout", str(tmp / "cloud-key.pem"), "-out", str(tmp / "cloud.pem"), "-subj", "/CN=cloud.example",
         "-addext", f"subjectAltName=IP:{DEPLOY_CLOUD}"],
        check=True, capture_output=True,
    )  # fmt: skip


def in_background(script: str) -> str:
    """Each command that serves (`meshnode cloud`, `meshnode run`) goes to the background, its
    output to NAME.out/.log, and the script waits for its ready line (or fails when it exits)."""
    out, count = [], 0
    for command in re.split(r"(?<!\\)\n", script):
        if re.match(r"\s*meshnode (cloud|run) ", command):
            count += 1
            name = f"serving-{count}"
            command = re.sub(r"\s+#[^\n]*$", "", command)
            command += (
                f" > {name}.out 2> {name}.log & pid=$!\n"
                f"until [ -s {name}.out ]; do kill -0 $pid || {{ cat {name}.log; exit 1; }}; sleep 0.5; done\n"
                f"cat {name}.out"
            )
        out.append(command)
    return "\n".join(out)


def test_deployment_md_runs_as_written(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    blocks = shell_blocks(DOCS / "deployment.md")
    assert len(blocks) >= 8 and any("meshnode cloud" in b for b in blocks)
    self_signed(tmp_path)
    script = "\n".join(blocks)
    for old, new in (
        ("postgresql://ledger@db.example/ledger", pg_url),
        ("--bind 0.0.0.0", f"--bind {DEPLOY_CLOUD}"),
        ("cloud.example", DEPLOY_CLOUD),
        ("10.20.0.7", DEPLOY_NODE),
        ("/var/lib/", f"{tmp_path}/var/lib/"),
    ):
        assert old in script, old
        script = script.replace(old, new)
    script = "set -euo pipefail\n" + in_background(script)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SSL_CERT_FILE": str(tmp_path / "cloud.pem"),  # the nodes trust the operator's CA (the page says how)
        "CURL_CA_BUNDLE": str(tmp_path / "cloud.pem"),
    }
    proc = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=600)  # a loaded 2-core machine: minutes
    except subprocess.TimeoutExpired:
        out = "(timed out)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and the cloud and node it started
        except ProcessLookupError:
            pass
        proc.wait()
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
    assert proc.returncode == 0, f"deployment.md failed:\n{out}{logs}"
    ready = [json.loads(line) for line in out.splitlines() if line.startswith('{"ready": true')]
    assert ready[0]["api"] == "token" and ready[0]["tokens"] == f"{tmp_path}/var/lib/meshnode-cloud", ready
    assert ready[0]["urls"] == [f"https://{DEPLOY_CLOUD}:8700"]
    assert "node bay-07" in out and f"cloud https://{DEPLOY_CLOUD}:8700" in out, out
    assert '"sessions":' in out  # the cloud's stats, read with its read-only token over HTTPS
    assert "Traceback" not in logs, logs
