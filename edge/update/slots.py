"""A/B application slots, the durable update state, and the boot-time guard.

Standard library only, on purpose: ``deploy/install.sh`` copies this file to
``/opt/hallkiosk/lib/hallkiosk_slots.py`` and the systemd unit runs it with the system
``python3`` before every start of the agent (``ExecStartPre``), so a slot whose venv is
broken can never stop its own rollback (the role U-Boot's boot counter plays for RAUC).

Layout under the root (``/opt/hallkiosk`` on a kiosk, a tmp dir in tests)::

    slots/a/, slots/b/        two venvs; a slot is complete only when its marker
                              ``slots/x/hallkiosk-slot.json`` exists (written last, fsynced)
    current -> slots/a        the unit runs current/bin/hallkiosk; swapped by rename(2) of
                              a temporary symlink, so it is always one or the other
    update.json               the update state (below), replaced atomically with fsync
    downloads/, tuf/          partial and verified bundles; the TUF metadata cache

States (``update.json``'s ``state``) and who moves them::

    idle -> preparing (download, verify, install into the other slot: edge.update.machine)
         -> installed -> switching -> trial (the agent, when no citizen is in session and
            no ticket is unacknowledged)
    trial -> committed (the new slot's agent passed its health check before the deadline)
    trial -> rolled_back (the check failed or timed out, or the guard counted too many
             boots into the trial slot; current points back to the old slot)
    any step -> failed (refused metadata or bundle: nothing switched)

A power cut leaves one of these states on disk; every step is written before and after
its effect, and each is idempotent, so ``guard`` plus the agent's next start finish or
undo it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

SLOTS = ("a", "b")
MARKER = "hallkiosk-slot.json"
STATE_FILE = "update.json"
#: States in which a switch has not happened (current is the slot we started from).
BEFORE_SWITCH = ("idle", "preparing", "installed", "failed", "committed", "rolled_back")
DEFAULT_MAX_TRIAL_BOOTS = 3
_CRASH_AT = frozenset(filter(None, os.environ.get("HALLKIOSK_CRASH_AT", "").split(",")))


def crash_point(name: str) -> None:
    """edge.failpoints.crash_point, repeated here to keep this file standalone."""
    if name in _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write, fsync, rename over, fsync the directory: after a power cut the file is the
    old one or the new one, never empty or half written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def now_ms() -> int:
    return int(time.time() * 1000)


class SlotError(RuntimeError):
    """A slot operation that cannot be done (no complete slot to point at)."""


class Slots:
    """The two slots and the ``current`` symlink under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.current_link = self.root / "current"
        self.state_path = self.root / STATE_FILE

    def path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise SlotError(f"slot {slot!r}: expected one of {SLOTS}")
        return self.root / "slots" / slot

    def active(self) -> str | None:
        """The slot ``current`` points at, or None (no link yet, or a foreign target)."""
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        name = Path(target).name
        return name if name in SLOTS and Path(target).parent.name == "slots" else None

    @staticmethod
    def other(slot: str | None) -> str:
        return "b" if slot == "a" else "a"

    def marker(self, slot: str) -> dict[str, Any] | None:
        """The slot's marker (version, sha256 of the bundle) if the slot is complete."""
        try:
            data = json.loads((self.path(slot) / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("version"), str) else None

    def version(self, slot: str | None) -> str | None:
        m = self.marker(slot) if slot else None
        return m["version"] if m else None

    def switch(self, slot: str) -> None:
        """Point ``current`` at ``slot`` atomically: a new symlink renamed over the old."""
        if self.marker(slot) is None:
            raise SlotError(f"slot {slot} is not complete (no {MARKER})")
        tmp = self.root / ".current.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(f"slots/{slot}", tmp)
        os.replace(tmp, self.current_link)
        _fsync_dir(self.root)

    # -- the state file --------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
            if isinstance(data, dict) and isinstance(data.get("state"), str):
                return data
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            # Only write_json_atomic writes it, so this is a damaged disk: start over
            # from what the symlink says, which is always a complete slot.
            pass
        return {"state": "idle"}

    def write_state(self, state: dict[str, Any]) -> dict[str, Any]:
        state = {**state, "updated_ms": now_ms()}
        write_json_atomic(self.state_path, state)
        return state

    def rollback(self, state: dict[str, Any], reason: str) -> dict[str, Any]:
        """Back to the slot the update started from (kept intact, never touched)."""
        back = state.get("from_slot")
        if back not in SLOTS or self.marker(back) is None:
            raise SlotError(f"rollback: slot {back!r} to go back to is not complete")
        if self.active() != back:
            self.switch(back)
        crash_point("update.rolled_back_link")
        return self.write_state({**state, "state": "rolled_back", "reason": reason[:256],
                                 "deadline_ms": None})


def guard(root: Path, *, now: int | None = None) -> dict[str, Any]:
    """Boot-time check (ExecStartPre, before every agent start): leave ``current`` at a
    complete slot and the state file saying what happened. Idempotent."""
    slots = Slots(root)
    state = slots.read_state()
    now = now_ms() if now is None else now
    kind = state["state"]
    to, back = state.get("to_slot"), state.get("from_slot")
    if kind == "switching":
        # Cut between writing "switching" and writing "trial": the rename either happened
        # or not, and the link says which.
        if slots.active() == to:
            state = slots.write_state({**state, "state": "trial", "boots": 0})
            kind = "trial"
        else:
            state = slots.write_state({**state, "state": "installed"})
            kind = "installed"
    if kind == "trial":
        if slots.active() != to:
            state = slots.write_state({**state, "state": "rolled_back",
                                       "reason": "current no longer points at the trial slot"})
        else:
            boots = int(state.get("boots", 0)) + 1
            limit = int(state.get("max_boots", DEFAULT_MAX_TRIAL_BOOTS))
            deadline = state.get("deadline_ms")
            if boots > limit:
                state = slots.rollback(state, f"no health check passed in {limit} boots")
            elif isinstance(deadline, int) and now > deadline:
                state = slots.rollback(state, "health check deadline passed")
            else:
                state = slots.write_state({**state, "boots": boots})
    active = slots.active()
    if active is None or slots.marker(active) is None:
        # No link, or a link to an incomplete slot (never made by us, but a field engineer
        # may have): point at a complete slot, the one the state trusts first.
        for cand in (back, state.get("committed_slot"), *SLOTS):
            if cand in SLOTS and slots.marker(cand) is not None:
                slots.switch(cand)
                break
        else:
            raise SlotError(f"{root}: no complete slot to boot")
    return state


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="hallkiosk_slots",
                                description="A/B slot guard (run before each agent start)")
    p.add_argument("command", choices=("guard", "status"))
    p.add_argument("--root", type=Path, default=Path("/opt/hallkiosk"))
    args = p.parse_args(argv)
    slots = Slots(args.root)
    try:
        state = guard(args.root) if args.command == "guard" else slots.read_state()
    except SlotError as exc:
        print(f"hallkiosk_slots: {exc}", file=sys.stderr)
        return 1
    active = slots.active()
    print(json.dumps({"active": active, "version": slots.version(active),
                      "state": state["state"], "reason": state.get("reason")}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
