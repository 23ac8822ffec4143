"""Mutation testing: mutmut 3 over the decision code, one module at a time (docs/testing.md).

    python bench/mutation.py                          every module in [tool.mutmut.modules]
    python bench/mutation.py crdt/_fold.py ...        only these
    python bench/mutation.py --report                 summarise the last runs, run nothing
    python bench/mutation.py --recheck crdt/_fold.py  re-test only the last run's survivors
                                                      (after adding tests that should kill them)

Each module runs in its own copy of the tree, build/mutation/<module>/ (so the worktree gets no
mutants/ directory and each module keeps its own cache: a second run re-tests only mutants whose
code or tests changed), with only that module mutated and only its fast tests selected, niced
(the machine is shared) and with MUTATION_JOBS workers (default 1). Prints JSON: per module the
mutants by status, the score, killed / (killed + survived + no tests), counting timeouts as killed
as mutmut does, and the surviving mutants by name. `cd build/mutation/<module> && mutmut show NAME`
prints a survivor's diff.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "mutation"

# mutmut's exit codes per mutant (mutmut/stats.py), as statuses.
STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "type check",
    None: "not checked",
}


def config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def workdir(module: str) -> Path:
    return BUILD / module.removesuffix(".py").replace("/", ".")


def prepare(module: str, spec: dict, base: dict) -> Path:
    """A copy of the tracked tree (uncommitted edits included) whose pyproject mutates `module` only."""
    work = workdir(module)
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--", "crdt", "uplink", "meshnode", "sim", "tests"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).exists():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    for name in subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "--", "tests"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split():
        shutil.copy2(ROOT / name, work / name)  # new test files not yet committed
    tests = [t for t in spec["tests"] if (ROOT / t).exists()]
    settings = {k: v for k, v in base.items() if k != "modules"}
    settings.update(only_mutate=[module], pytest_add_cli_args_test_selection=tests)
    lines = ["[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    lines += ["", "[tool.pytest.ini_options]"] + [f"{k} = {json.dumps(v)}" for k, v in pytest_ini.items()]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return work


def run(module: str, spec: dict, base: dict, *, recheck: bool = False) -> None:
    names = list(spec.get("mutants", []))
    meta = workdir(module) / "mutants" / (module + ".meta")
    if recheck:
        names = summarise(module, spec).get("survivors", [])
        if not names:
            return
        # mutmut forgets every verdict when the test selection changes (a new test file): keep
        # the earlier ones, for mutants this run does not re-test. Sound when tests were only
        # added (an added test cannot revive a killed mutant); after changing or removing
        # tests, run the module afresh instead.
        earlier = json.loads(meta.read_text())["exit_code_by_key"]
        kept = workdir(module) / "earlier.json"
        if kept.exists():
            before = json.loads(kept.read_text())
            earlier = {k: (before.get(k) if v is None else v) for k, v in earlier.items()}
        kept.write_text(json.dumps(earlier))
        # Which tests reach which function was recorded before the new tests existed: record it
        # again, or mutmut would not run the new tests against the survivors.
        (workdir(module) / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    else:
        (workdir(module) / "earlier.json").unlink(missing_ok=True)
    work = prepare(module, spec, base)
    mutmut = Path(sys.executable).with_name("mutmut")
    jobs = os.environ.get("MUTATION_JOBS", "1")
    env = dict(os.environ, PYTHONPATH=str(work))
    log = work / "mutmut.log"
    print(f"mutating {module} ({', '.join(spec['tests'])}); log in {log}", file=sys.stderr, flush=True)
    with log.open("w") as out:
        proc = subprocess.run(
            ["nice", "-n", "10", str(mutmut), "run", "--max-children", jobs, *names],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        sys.exit(f"mutmut failed on {module}; see {log}")


def summarise(module: str, spec: dict) -> dict:
    import fnmatch

    meta = workdir(module) / "mutants" / (module + ".meta")
    if not meta.exists():
        return {"module": module, "error": "not run yet"}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    earlier = workdir(module) / "earlier.json"
    if earlier.exists():
        kept = json.loads(earlier.read_text())
        codes = {k: (kept.get(k) if v is None else v) for k, v in codes.items()}
    patterns = spec.get("mutants")
    if patterns:
        codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}
    counts = Counter(STATUS.get(code, "suspicious") for code in codes.values())
    caught = counts["killed"] + counts["timeout"]
    judged = caught + counts["survived"] + counts["no tests"]
    survivors = sorted(k for k, v in codes.items() if STATUS.get(v) in ("survived", "no tests"))
    return {
        "module": module,
        "mutants": len(codes),
        **dict(sorted(counts.items())),
        "score": round(caught / judged, 3) if judged else None,
        "survivors": survivors,
    }


def main() -> None:
    base = config()
    modules = base["modules"]
    args = sys.argv[1:]
    report_only, recheck = "--report" in args, "--recheck" in args
    chosen = [a for a in args if a not in ("--report", "--recheck")] or list(modules)
    unknown = [m for m in chosen if m not in modules]
    if unknown:
        sys.exit(f"not in [tool.mutmut.modules]: {unknown}")
    if not report_only:
        for module in chosen:
            run(module, modules[module], base, recheck=recheck)
    results = [summarise(m, modules[m]) for m in chosen]
    caught = sum(r.get("killed", 0) + r.get("timeout", 0) for r in results)
    judged = caught + sum(r.get("survived", 0) + r.get("no tests", 0) for r in results)
    print(
        json.dumps(
            {"benchmark": "mutation", "modules": results, "score": round(caught / judged, 3) if judged else None},
            indent=1,
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
