"""Benchmark: how fast the ``syncbus`` command line starts (target: ``--help`` < 0.3 s).

Prints the median and fastest wall time of N runs of ``python -m bus.cli --help`` and
of two sub-command helps (interpreter start included), the bare interpreter's start
for comparison, and ``import bus.cli.main`` as ``-X importtime`` reports it, with the
slowest packages it pulled in. Nothing is asserted: ``tests/unit/test_cli_imports.py``
guards which modules the CLI imports; this shows what that costs on this machine.

Usage: .venv/bin/python tests/bench/bench_cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The command lines timed, after ``python``.
COMMANDS = (
    ("-c", "pass"),
    ("-m", "bus.cli", "--help"),
    ("-m", "bus.cli", "status", "--help"),
    ("-m", "bus.cli", "tx", "stats", "--help"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="Runs per command (default 10).")
    ap.add_argument("--top", type=int, default=8, help="Slowest imported packages shown.")
    args = ap.parse_args()
    print(f"{'command':<40} {'median':>8} {'fastest':>8}   ({args.runs} runs)")
    for argv in COMMANDS:
        times = [_wall(argv) for _ in range(args.runs)]
        label = "python " + " ".join(argv)
        print(f"{label:<40} {statistics.median(times):7.3f}s {min(times):7.3f}s")
    total, packages = _import_time()
    print(f"\nimport bus.cli.main: {total / 1000:.1f} ms (-X importtime, cumulative)")
    for name, micros in packages[:args.top]:
        print(f"  {name:<30} {micros / 1000:7.1f} ms")


def _wall(argv: tuple[str, ...]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _import_time() -> tuple[int, list[tuple[str, int]]]:
    """``import bus.cli.main``'s cumulative microseconds, and what it imported directly
    (slowest first)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import bus.cli.main"],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    # Lines read "import time: SELF | CUMULATIVE | NAME", NAME indented two spaces a
    # level, children before their parent.
    children: list[tuple[str, int]] = []
    for line in done.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name, micros = fields[2][1:], int(fields[1])
        depth = (len(name) - len(name.lstrip())) // 2
        if depth == 0 and name == "bus.cli.main":
            return micros, sorted(children, key=lambda child: -child[1])
        if depth == 0:
            children = []
        elif depth == 1:
            children.append((name.strip(), micros))
    return 0, []

if __name__ == "__main__":
    main()
