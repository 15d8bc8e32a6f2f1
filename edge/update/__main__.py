"""``python -m edge.update prepare|switch|commit|rollback|guard|status --config update.toml``.

``prepare`` is what the agent starts as a child process; the others are for the field
engineer and the tests (the agent calls them in-process).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.update.machine import UpdateConfig, UpdateMachine, running_slot
from edge.update.slots import guard
from hallkiosk.errors import HallkioskError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.update")
    p.add_argument("command", choices=("request", "prepare", "switch", "commit", "rollback",
                                       "guard", "status"))
    p.add_argument("--config", type=Path, default=Path("/etc/hallkiosk/update.toml"))
    p.add_argument("--target")
    p.add_argument("--version")
    p.add_argument("--reason", default="rolled back by hand")
    args = p.parse_args(argv)
    try:
        m = UpdateMachine(UpdateConfig.load(args.config))
        if args.command == "request":
            st = m.request(args.target, version=args.version)
        elif args.command == "prepare":
            st = m.prepare()
        elif args.command == "switch":
            st = m.switch()
        elif args.command == "commit":
            st = m.commit(m.slots.active())
        elif args.command == "rollback":
            st = m.rollback(args.reason)
        elif args.command == "guard":
            st = guard(m.cfg.root)
        else:
            st = m.state()
    except (HallkioskError, RuntimeError) as exc:
        print(f"edge.update {args.command}: {exc}", file=sys.stderr)
        return 2
    active = m.slots.active()
    print(json.dumps({"active": active, "version": m.slots.version(active),
                      "running": running_slot(m.cfg.root), **st}, sort_keys=True))
    return 1 if st["state"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
