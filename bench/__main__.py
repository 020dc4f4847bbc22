"""`make bench`: run every benchmark (bench/bench_*.py), or those named on the command line.

Each benchmark is a module with a main() that prints a table and writes
bench/results/<name>.json. They run one after another, each in its own process, so one
benchmark's memory or threads do not disturb the next.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    names = sys.argv[1:] or sorted(p.stem for p in HERE.glob("bench_*.py"))
    failed = []
    for name in names:
        print(f"\n== {name} ==", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}"]).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
