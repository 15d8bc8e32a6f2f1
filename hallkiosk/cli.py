"""The `hallkiosk` console command.

Each subcommand imports what it needs only when chosen, so `hallkiosk agent` on a kiosk
never loads the emulator, Pillow or rich. The agent's own command line, as systemd gives it,
is parsed by argparse like every other.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from hallkiosk import __version__
from hallkiosk.errors import HallkioskError

if TYPE_CHECKING:
    import argparse

#: The agent's defaults and log levels.
AGENT_DEFAULT_CONFIG = "/etc/hallkiosk/agent.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _agent(args: argparse.Namespace) -> int:
    from edge.agent import run_agent
    from edge.logs import setup_logging

    setup_logging(args.log_level)
    return run_agent(args.config, install_signals=True)


def _check_config(args: argparse.Namespace) -> int:
    from edge.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: OK (device {cfg.kiosk.device_id}, hall {cfg.kiosk.hall}, "
          f"board {cfg.board.model}, {len(cfg.services)} services, digest {cfg.digest[:12]})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from emulator.demo import run_demo

    return run_demo(Path(args.out), citizens=args.citizens)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from emulator.bench import run_bench

    return run_bench(Path(args.out), tickets=args.tickets, ops_procs=args.ops_procs)


def _proc_counts(text: str) -> tuple[int, ...]:
    from emulator.bench_ops import parse_proc_counts   # only when the option is given

    return parse_proc_counts(text)


def build_parser(*, tools: bool = True) -> argparse.ArgumentParser:
    """The whole command line. ``tools=False`` leaves out the subcommands whose modules pull
    in numpy, Pillow or the QR pipeline: the kiosk's own process (``hallkiosk agent``) never
    loads them (about 10 MB of RSS on a board that has 1 GB or less)."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="hallkiosk", description="Edge agent for self-service kiosks "
                                "in government service halls, and the tools around it.")
    p.add_argument("--version", action="version", version=f"hallkiosk {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("agent", help="run the kiosk agent (what systemd starts on the kiosk)")
    a.add_argument("--config", type=Path, default=Path(AGENT_DEFAULT_CONFIG))
    a.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    a.set_defaults(func=_agent)

    c = sub.add_parser("check-config", help="validate an agent config file and exit")
    c.add_argument("--config", type=Path, default=Path("/etc/hallkiosk/agent.toml"))
    c.set_defaults(func=_check_config)

    d = sub.add_parser("demo", help="one emulated kiosk, a real local broker, a stream of citizens")
    d.add_argument("--out", default="demo-out", help="where the rendered tickets are left")
    d.add_argument("--citizens", type=int, default=8)
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="all benchmarks: ticket path, QR pipeline, ops ingest")
    b.add_argument("--out", default="bench-out")
    b.add_argument("--tickets", type=int, default=200)
    b.add_argument("--ops-procs", type=_proc_counts, default=(1, 2), metavar="N,N",
                   help="monitor process counts for the ops ingest bench (default 1,2; "
                        "1 is always run)")
    b.set_defaults(func=_bench)

    if not tools:
        return p
    # Subcommands owned by their packages (each module builds its own parser).
    from edge.cells.node import add_parser as add_cell_node
    from emulator.bench_qr import add_parser as add_qr_bench
    from emulator.booking import add_parser as add_qr_code
    from hall.cli import add_parser as add_hall
    from ops.cli import add_parser as add_ops
    from provisioning.cli import add_parser as add_provision

    add_provision(sub)
    add_ops(sub)
    add_cell_node(sub)
    add_qr_bench(sub)
    add_qr_code(sub)
    add_hall(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lean = bool(argv) and argv[0] in ("agent", "check-config")
    args = build_parser(tools=not lean).parse_args(argv)
    try:
        return args.func(args)
    except HallkioskError as exc:
        print(f"hallkiosk {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
