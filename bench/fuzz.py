"""Benchmark: coverage-guided fuzzing of every CoAP resource, the node's HTTP API, OCPP frames and the cloud.

Runs ``tests/fuzz_targets.py`` (atheris on libFuzzer) in a child process for
``--inputs`` inputs across all targets (the first byte of each input picks the
target, so coverage feedback spans them all; ``--target NAME`` fuzzes one,
``python -m tests.fuzz_targets --list`` names them) and prints one JSON object:

- ``inputs``, ``crashes`` (a handler's 5.00, an exception past the dispatcher,
  the ASGI app or an OCPP handler's `route_message`, an HTTP 5xx, an OCPP
  InternalError "An unexpected error occurred.", no answer within 15 s, a
  guarded /v1 route answering without a valid token), ``documents_changed``
  (heads or number of documents changed, the cloud's ledger, reviews or site
  entries changed, where the target did not acknowledge a write: a 201, an
  OCPP CALLRESULT), ``writes_acknowledged`` (those that did: data that grows
  by design), ``incarnation_refutations`` (member records about the node that
  made it raise its incarnation, SWIM's refutation: counted, not a failure);
- ``log_lines`` and ``log_lines_by_template``: the WARNING and ERROR lines the
  fuzzed code wrote (bad input is logged at a bounded rate, not per input);
- ``victim_state``: what each node and the OCPP server keep (documents and
  their changes, sync states, neighbours, chargers and connectors);
- ``rss_start_mb``, ``rss_after_warmup_mb`` (after the first tenth of the
  inputs), ``rss_end_mb`` of the fuzzing process and ``rss_series`` (50 samples);
- ``libfuzzer``: libFuzzer's last status line (corpus entries and bytes it
  holds in memory, coverage features, its RSS), so native growth can be told
  from the Python heap's;
- with ``--tracemalloc``, ``python_heap``: the traced Python heap at the
  warm-up and at the end, and the allocation sites that grew most;
- ``failures`` and ``examples`` (hex inputs) if anything failed.

The target is 0 crashes, 0 documents changed, and RSS after the warm-up that
stays flat (growth per input far below the 2.6 KB the field fuzz saw).

    python bench/fuzz.py --inputs 1000000 [--target coap:/m/sync:POST] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def libfuzzer_status(log: str) -> dict[str, str | int]:
    """libFuzzer's own last status line: its corpus (entries, bytes held in memory), coverage, RSS."""
    lines = [line for line in log.splitlines() if line.startswith("#") and " corp: " in line]
    if not lines:
        return {}
    last = lines[-1]
    fields = dict(re.findall(r"(\w+): (\S+)", last))
    entries, _, size = fields.get("corp", "/").partition("/")
    return {
        "line": last.strip(),
        "corpus_entries": int(entries) if entries.isdigit() else 0,
        "corpus_size": size,
        "features": fields.get("ft", ""),
        "rss": fields.get("rss", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--target", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tracemalloc", action="store_true", help="also report what the Python heap grew by")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshnode-fuzz-bench-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "tests.fuzz_targets",
            "--inputs",
            str(args.inputs),
            "--json",
            str(out),
            "--seed",
            str(args.seed),
        ]
        if args.target:
            cmd += ["--target", args.target]
        if args.tracemalloc:
            cmd += ["--tracemalloc"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log = Path(tmp) / "libfuzzer.log"
        with open(log, "w") as err:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, check=False)
        if not out.exists():
            sys.stderr.write(log.read_text()[-5000:])
            raise SystemExit(f"fuzzing process ended with {proc.returncode} before its report")
        report = json.loads(out.read_text())
        report["exit_code"] = proc.returncode
        report["libfuzzer"] = libfuzzer_status(log.read_text(errors="replace"))
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
