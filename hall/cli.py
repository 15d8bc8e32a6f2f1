"""``hallkiosk hall``: the hall day (``make hall``). Prints a progress bar while it runs and
the report at the end; exit status 1 when anything was lost, duplicated or printed twice."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    h = sub.add_parser("hall", help="a hall day: 50 real agents, one broker, faults, the report")
    h.add_argument("--kiosks", type=int, default=50)
    h.add_argument("--cells", type=int, default=13)
    h.add_argument("--tickets", type=int, default=5708)
    h.add_argument("--speed", type=float, default=30.0,
                   help="day seconds per wall second (08:30-17:00 takes 30,600/speed s)")
    h.add_argument("--seed", type=int, default=1)
    h.add_argument("--no-faults", action="store_true")
    h.add_argument("--keepalive-s", type=int, default=10)
    h.add_argument("--blackhole-s", type=float, default=30.0)
    h.add_argument("--out", type=Path, default=Path("hall-out"))
    h.set_defaults(func=cmd_hall)
    return h


def cmd_hall(args: argparse.Namespace) -> int:
    import logging

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .report import render_terminal
    from .run import HallSpec, run_hall_day

    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=args.out / "hall.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = HallSpec(kiosks=args.kiosks, cells=args.cells, tickets=args.tickets, speed=args.speed,
                    seed=args.seed, faults=not args.no_faults, keepalive_s=args.keepalive_s,
                    blackhole_s=args.blackhole_s)
    spec.check()
    with Progress(TextColumn("hall day"), BarColumn(), MofNCompleteColumn(), TextColumn("tickets"),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("tickets", total=spec.tickets)
        report = run_hall_day(spec, args.out,
                              progress=lambda done, total: bar.update(task, completed=done))
    print(render_terminal(report))
    return 0 if report["ok"] else 1
