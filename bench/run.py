"""Run the Argon benchmarks and regenerate docs/benchmarks.md.

Usage:
  python bench/run.py [--quick] [--only NAME[,NAME...]] [--no-docs]

Scenarios: throughput, latency, scaling, overload, payloads, security, callers, dashboard (in that order).
``--quick`` runs a short smoke version of each (about a minute and a half in all).
Results go to bench/results/<scenario>.json and .png; the doc is rebuilt from every
record there, so ``--only`` refreshes one section and keeps the others.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent

from bench import callers, common, dashboard, latency, overload, payloads, report, scaling, security, throughput

SCENARIOS = {
    "throughput": throughput.run,
    "latency": latency.run,
    "scaling": scaling.run,
    "overload": overload.run,
    "payloads": payloads.run,
    "security": security.run,
    "callers": callers.run,
    "dashboard": dashboard.run,
}


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in the main greenlet, so every ``finally`` kills its processes."""
    main = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.get_hub().loop.run_callback(main.throw, SystemExit(143)))


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; returns 1 if any of them failed to run (not if a target is missed)."""
    parser = argparse.ArgumentParser(description="Run the Argon benchmarks (see docs/benchmarks.md).")
    parser.add_argument("--quick", action="store_true", help="short smoke version of every scenario")
    parser.add_argument("--only", help=f"comma-separated scenarios to run: {', '.join(SCENARIOS)}")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    _stop_on_sigterm()
    started = time.monotonic()
    failed = []
    try:
        for name in names:
            print(f"-- running {name}{' (quick)' if args.quick else ''} ...", flush=True)
            try:
                common.print_record(SCENARIOS[name](args.quick))
            except Exception:
                traceback.print_exc()
                failed.append(name)
    finally:
        stray = common.sweep()
        if stray:
            print(f"killed {stray} stray benchmark processes", file=sys.stderr)
    if not args.no_docs:
        print(f"wrote {report.write()}")
    print(f"done in {time.monotonic() - started:.0f}s" + (f"; FAILED to run: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
