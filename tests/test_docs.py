"""The quick start in docs/running.md works as written (issue 14, trap 1).

Every ```sh block of the page runs, in order, in one bash shell, as a new user would
paste them, with two substitutions only: the loopback addresses become 127.0.18.x (the
page's 127.0.0.x may be taken on a shared machine) and /tmp/ becomes a fresh folder.
`meshnode` is found on PATH, as the page says.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
