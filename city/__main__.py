"""``python -m city`` (``make city``): the fault scenario at a larger size, figures printed
and written to ``--out``/city.json. Every process is started here, on loopback, and stopped."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .faults import run_bridge_cut, run_faults
from .harness import CityRun


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m city", description=__doc__)
    ap.add_argument("--halls", type=int, default=3)
    ap.add_argument("--kiosks", type=int, default=4, help="kiosks per hall")
    ap.add_argument("--per-kiosk", type=int, default=3, help="tickets per kiosk per phase")
    ap.add_argument("--cut-s", type=float, default=20.0, help="how long the city is cut off")
    ap.add_argument("--bridge-cut-s", type=float, default=120.0,
                    help="how long one hall's bridge is cut while the rest of the city runs")
    ap.add_argument("--central", type=int, default=2,
                    help="central `hallkiosk ops run` instances (halls split between them)")
    ap.add_argument("--out", type=Path, default=Path("city-out"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hallkiosk-city-") as work:
        with CityRun(work, halls=args.halls, kiosks_per_hall=args.kiosks,
                     central_ops=min(args.central, args.halls)) as run:
            started_s = time.monotonic() - t0
            fig = run_faults(run, per_kiosk=args.per_kiosk, cut_s=args.cut_s)
        # A second city whose bridges dial through uplink relays, for the one-hall cut
        # (docs/city.md: relays in front of a whole-city restart stalled Mosquitto's bridge).
        with CityRun(Path(work) / "relayed", halls=args.halls,
                     kiosks_per_hall=args.kiosks, uplink_relays=True) as run:
            cut = run_bridge_cut(run, cut_s=args.bridge_cut_s)
        fig.update({k: v for k, v in cut.items() if k.startswith("bridge_cut")})
        fig["bridge_cut_lost_hall"] = cut["lost_hall"]
        fig["bridge_cut_lost_city"] = cut["lost_city"]
    fig = {"halls": args.halls, "kiosks": args.halls * args.kiosks, "cut_s": args.cut_s,
           "start_s": round(started_s, 1), **{k: round(v, 2) if isinstance(v, float) else v
                                                 for k, v in fig.items()}}
    (args.out / "city.json").write_text(json.dumps(fig, indent=2) + "\n")
    for k, v in fig.items():
        print(f"{k:30} {v}")
    ok = (fig["lost_hall"] == 0 and fig["lost_city"] == 0
          and fig["bridge_cut_city_acked_during_cut"] == 0
          and fig["bridge_cut_lost_hall"] == 0 and fig["bridge_cut_lost_city"] == 0)
    print("acknowledged tickets lost: 0" if ok else "ACKNOWLEDGED TICKETS LOST")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
