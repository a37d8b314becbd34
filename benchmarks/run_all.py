"""Run every benchmark with its defaults, one after the other, print their outputs and a summary table.

Run: python benchmarks/run_all.py [names...] [--out PREFIX] [--args NAME=ARGS ...]
  names: e.g. `run_all.py loader epoch` (default: all but storage, which runs only when named);
  --out PREFIX: also write the table as PREFIX.json (every result record) and PREFIX.md (default: print only);
  --args NAME=ARGS: extra flags for one script, e.g. --args "study=--clips 4 --repeats 1" (repeatable).
About 20 minutes on 2 CPU cores. Run it on a quiet machine: each script reports how much CPU other
processes took while it ran.

Each script prints its headline figures as `result: {json}` lines (`_common.print_result`); the table
has one row per such line, and a row saying so for a script that failed or printed none.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, read_result  # noqa: E402

SCRIPTS = ["decoder", "extract", "epoch", "loader", "text_head", "study", "scale", "join", "finetune"]
ON_REQUEST = ["storage"]  # run only when named: bench_storage.py trains every option on two datasets, 3 seeds each (about 45 minutes here)
COLUMNS = ("question", "ours", "baseline", "ratio", "goal", "load")


def run_script(name: str, extra: list[str]) -> tuple[int, list[dict], float]:
    """Run benchmarks/bench_NAME.py, echoing its output live: (exit code, its result records, seconds)."""
    script = HERE / f"bench_{name}.py"
    print(f"\n===== {script.name} {' '.join(extra)} =====", flush=True)
    start = time.perf_counter()
    records = []
    with subprocess.Popen([sys.executable, str(script), *extra], stdout=subprocess.PIPE, text=True, bufsize=1,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            record = read_result(line)
            if record is not None:
                records.append(record)
    seconds = time.perf_counter() - start
    print(f"===== {script.name}: exit {process.returncode}, {seconds:.0f} s =====", flush=True)
    return process.returncode, records, seconds


def figure(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def row(record: dict) -> dict[str, str]:
    """The table's cells of one result record."""
    if "failed" in record:
        return {"question": f"bench_{record['name']}.py", "ours": record["failed"], "baseline": "", "ratio": "",
                "goal": "", "load": ""}
    goal = record["goal"] or "none set"
    if record["met"] is not None:
        goal += " (met)" if record["met"] else " (not met)"
    share = record["others_share"]
    load = "not measured" if share is None else f"others {100 * share:.0f} % CPU"
    if record["contaminated"]:
        load += " (contaminated)"
    return {"question": record["question"], "ours": f"{figure(record['ours'])} {record['unit']}",
            "baseline": f"{figure(record['baseline'])} {record['unit']}",
            "ratio": f"{record['ratio']:.3g} ({record['ratio_of']})", "goal": goal, "load": load}


def text_table(rows: list[dict[str, str]]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS), "  ".join("-" * widths[c] for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c].replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def machine_words(m: dict) -> str:
    return (f"{m['platform']}, CPU {m['cpu']}, {m['cores']} cores, GPU {m.get('gpu', 'none')}, python {m['python']}, "
            f"torch {m['torch']} with {m['threads']} threads")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {SCRIPTS} [default: all]")
    parser.add_argument("--out", type=Path, default=None, metavar="PREFIX",
                        help="write the summary as PREFIX.json and PREFIX.md [default: print only]")
    parser.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                        help="extra flags for one benchmark, e.g. 'study=--clips 4' (repeatable)")
    args = parser.parse_args()
    names = args.names or SCRIPTS
    unknown = [n for n in names if n not in SCRIPTS + ON_REQUEST]
    extra = {}
    for item in args.args:
        name, _, flags = item.partition("=")
        if name not in SCRIPTS + ON_REQUEST:
            unknown.append(name)
        extra[name] = shlex.split(flags)
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS + ON_REQUEST}", file=sys.stderr)
        return 2

    started = datetime.datetime.now().astimezone()
    records, failed = [], []
    for name in names:
        code, found, seconds = run_script(name, extra.get(name, []))
        records += found
        if code or not found:
            failed.append(name)
            records.append({"name": name, "failed": f"exit {code}" if code else "printed no result line",
                            "seconds": seconds})
    rows = [row(r) for r in records]
    machine_now = machine()
    print(f"\n===== summary: {started:%Y-%m-%d %H:%M %Z}; machine: {machine_words(machine_now)} =====")
    print(text_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"started": started.isoformat(timespec="seconds"), "machine": machine_now,
                   "args": {name: extra.get(name, []) for name in names}, "results": records}
        json_path, md_path = args.out.with_name(args.out.name + ".json"), args.out.with_name(args.out.name + ".md")
        json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        flags = "; ".join(f"bench_{n}.py {' '.join(extra[n])}" for n in names if extra.get(n))
        md_path.write_text(f"Measured on {started:%Y-%m-%d}; machine: {machine_words(machine_now)}"
                           f"{'; flags: ' + flags if flags else ' (default flags)'}.\n\n{markdown_table(rows)}\n")
        print(f"wrote {json_path} and {md_path}")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
