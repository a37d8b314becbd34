"""Run every benchmark with its defaults, one after the other, and print their outputs.

Run: python benchmarks/run_all.py [names...]   (e.g. `run_all.py loader epoch`; default: all)
About 20 minutes on 2 CPU cores. Run it on a quiet machine: each script reports how much CPU other
processes took while it ran.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["decoder", "extract", "epoch", "loader", "text_head", "scale", "join"]


def main() -> int:
    names = sys.argv[1:] or SCRIPTS
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        script = HERE / f"bench_{name}.py"
        print(f"\n===== {script.name} =====", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)])
        print(f"===== {script.name}: exit {code}, {time.perf_counter() - start:.0f} s =====", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
