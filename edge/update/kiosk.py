"""What the agent does about updates: the ``update`` command, the idle check before a
switch, the health gate that commits a new slot, and the update fields of its state.

Wiring (edge.agent): ``KioskUpdates.for_agent_config(cfg)`` is None when the kiosk has no
``update.toml`` next to its agent.toml (updates not provisioned); otherwise the agent calls
``tick(view)`` every loop turn with a ``KioskView`` of what it knows, publishes the
events ``tick`` returns, and exits when ``tick`` says so (systemd then starts the slot
``current`` points at).

Rules, and why:

- **never while a citizen is there**: the command is refused (``failed``, reason
  ``busy: ...``) while a session is active or any ticket is unacknowledged, and the switch
  itself waits for the same two conditions, since a citizen may come while the bundle
  downloads. An unacknowledged ticket stays in the durable outbox (outside the slots), so
  even a switch would not lose it; waiting keeps the ledger's view simple.
- **health gate**: a slot in trial is committed by its own agent once, before the
  deadline, all of these hold: the agent reached READY, the broker link is up, the reader
  and the printer each answered a self-test (their health is known and not down), and the
  outbox is empty (every ticket acknowledged end to end). Past the deadline the agent
  rolls back itself; if it cannot even run, the boot guard (edge.update.slots.guard) rolls
  back after ``max_trial_boots`` starts or the deadline.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge.update.errors import UpdateRefused
from edge.update.machine import IN_PROGRESS, UpdateConfig, UpdateMachine, running_slot
from edge.update.slots import now_ms

log = logging.getLogger("hallkiosk.update")

TARGET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
#: Re-read the state file at most this often while a child prepares (ms).
POLL_MS = 1000
#: A prepare that ended with the repository unreachable is started again after this, doubling
#: up to RETRY_MAX_MS (a hall network down must not make every kiosk hammer the repository).
RETRY_MIN_MS = 15_000
RETRY_MAX_MS = 600_000
#: A prepare child that dies of an uncaught exception (exit status 1 with the state still
#: ``preparing``; a power cut or a kill is a signal, an unreachable repository exit 0) this
#: many times in a row fails the update (``install_failed``): a bug in the kiosk's Python
#: (the QEMU campaign's tarfile TypeError) must reach ops, not retry for ever.
MAX_PREPARE_CRASHES = 3
#: Outcomes whose event must be published once even across restarts (a rollback by the boot
#: guard has no agent running to report it; the next start does).
TERMINAL = ("committed", "rolled_back", "failed")


@dataclass(frozen=True, slots=True)
class KioskView:
    """What the gate and the idle check look at, taken from the agent each turn."""

    ready: bool
    link_up: bool
    reader_ok: bool | None      # None: no self-test answer yet
    printer_ok: bool | None
    outbox_depth: int
    in_session: bool


@dataclass(frozen=True, slots=True)
class Tick:
    """What the agent should do after a turn: events to publish, whether to exit."""

    events: tuple[tuple[str, str, dict[str, Any]], ...] = ()
    exit_reason: str | None = None
    state_changed: bool = False


def check_args(args: dict[str, Any]) -> tuple[str, str | None, int | None]:
    """The ``update`` command's args (docs/mqtt-contract.md, "update")."""
    unknown = set(args) - {"target", "version", "deadline_s"}
    if unknown:
        raise UpdateRefused("bad_args", f"unknown args: {', '.join(sorted(unknown))}")
    target, version, deadline = args.get("target"), args.get("version"), args.get("deadline_s")
    if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
        raise UpdateRefused("bad_args", "target: a bundle file name is required")
    if version is not None and (not isinstance(version, str) or not VERSION_RE.fullmatch(version)):
        raise UpdateRefused("bad_args", "version: 1-64 of A-Z a-z 0-9 . + _ -")
    if deadline is not None and (type(deadline) is not int or not 30 <= deadline <= 3600):
        raise UpdateRefused("bad_args", "deadline_s: an integer 30..3600")
    return target, version, deadline


class KioskUpdates:
    def __init__(self, cfg: UpdateConfig, *, slot: str | None = None,
                 spawn: Callable[[list[str]], Any] | None = None,
                 wall_ms: Callable[[], int] = now_ms) -> None:
        self.cfg = cfg
        self.machine = UpdateMachine(cfg)
        self.slot = slot if slot is not None else running_slot(cfg.root)
        self._spawn = spawn or (lambda argv: subprocess.Popen(argv, start_new_session=True))
        self._wall_ms = wall_ms
        self._child: Any = None
        self._state = self.machine.state()
        kind = self._state["state"]
        self._seen = self._state.get("reported") if kind in TERMINAL else kind
        self._next_poll = 0
        self._retry_at = 0
        self._retry_ms = RETRY_MIN_MS
        self._crashes = 0

    @classmethod
    def for_agent_config(cls, agent_config_path: Path) -> KioskUpdates | None:
        path = Path(agent_config_path).parent / "update.toml"
        return cls(UpdateConfig.load(path)) if path.exists() else None

    # -- the command ---------------------------------------------------------------------
    def request(self, args: dict[str, Any], view: KioskView,
                nonce: str | None) -> tuple[str, str | None, dict[str, Any]]:
        """The ``update`` command: (status, reason, detail) for its cmd_result."""
        try:
            target, version, deadline = check_args(args)
            if view.in_session:
                raise UpdateRefused("busy", "a citizen is in session")
            if view.outbox_depth:
                raise UpdateRefused("busy", f"{view.outbox_depth} tickets unacknowledged")
            self._state = self.machine.request(target, version=version, nonce=nonce,
                                               deadline_s=deadline)
        except UpdateRefused as exc:
            return "failed", str(exc), {"code": exc.code, **self.fields()}
        self._start_prepare()
        return "done", "update started", {"to_slot": self._state["to_slot"], **self.fields()}

    def _start_prepare(self) -> None:
        if self._child is not None and self._child.poll() is None:
            return
        argv = [sys.executable, "-m", "edge.update", "prepare"]
        if self.cfg.source is not None:
            argv += ["--config", str(self.cfg.source)]
        self._child = self._spawn(argv)

    # -- every turn ------------------------------------------------------------------------
    def fields(self) -> dict[str, Any]:
        """Flat fields for the retained state's ``extra``: slot, version, update state."""
        st = self._state
        out: dict[str, Any] = {"slot": self.machine.slots.active(),
                               "update_state": st["state"],
                               "update_target": st.get("version") or st.get("target")}
        if st.get("code"):
            out["update_code"] = str(st["code"])[:64]
        return out

    def tick(self, view: KioskView) -> Tick:
        now = self._wall_ms()
        child_done = self._child is not None and self._child.poll() is not None
        if child_done or now >= self._next_poll:
            self._state = self.machine.state()
            self._next_poll = now + POLL_MS
            if child_done:
                status = self._child.poll()
                self._child = None
                preparing = self._state["state"] == "preparing"
                self._crashes = self._crashes + 1 if preparing and status == 1 else 0
                if self._crashes >= MAX_PREPARE_CRASHES:
                    self._crashes = 0
                    self._state = self.machine.slots.write_state({
                        **self._state, "state": "failed", "code": "install_failed",
                        "reason": f"the prepare step crashed {MAX_PREPARE_CRASHES} times in "
                                  "a row (exit status 1; the kiosk's journal has the trace)"})
                elif preparing:                          # unreachable or cut: retry later
                    self._retry_at = now + self._retry_ms
                    self._retry_ms = min(2 * self._retry_ms, RETRY_MAX_MS)
                else:
                    self._retry_ms = RETRY_MIN_MS
        st = self._state
        kind = st["state"]
        events: list[tuple[str, str, dict[str, Any]]] = []
        changed = kind != self._seen
        if changed:
            events.append(_event_for(st))
            self._seen = kind
        exit_reason = None
        if kind == "preparing" and self._child is None and now >= self._retry_at:
            self._start_prepare()                      # after a restart or a cut: resume
        elif kind == "installed" and not view.in_session and view.outbox_depth == 0:
            self._state = self.machine.switch()
            events.append(("update_switching", "info",
                           {"to_slot": st["to_slot"], "version": st.get("version")}))
            self._seen = self._state["state"]
            exit_reason = f"update: switching to slot {st['to_slot']}"
        elif kind == "trial" and self.slot == st.get("to_slot"):
            if view.ready and view.link_up and view.reader_ok and view.printer_ok \
                    and view.outbox_depth == 0:
                self._state = self.machine.commit(self.slot)
                self._seen = self._state["state"]
                events.append(_event_for(self._state))
                changed = True
            elif isinstance(st.get("deadline_ms"), int) and now > st["deadline_ms"]:
                failed = [n for n, ok in (("ready", view.ready), ("broker", view.link_up),
                                          ("reader", view.reader_ok),
                                          ("printer", view.printer_ok),
                                          ("outbox", view.outbox_depth == 0)) if not ok]
                self._state = self.machine.rollback(
                    "health check failed before the deadline: " + ",".join(failed))
                self._seen = self._state["state"]
                events.append(_event_for(self._state))
                exit_reason = "update: rolled back, restarting into the previous slot"
        st = self._state
        if st["state"] in TERMINAL and st.get("reported") != st["state"] and self._child is None:
            # No child writes the file in these states, so this cannot lose its update.
            self._state = self.machine.slots.write_state({**st, "reported": st["state"]})
        return Tick(tuple(events), exit_reason, changed or exit_reason is not None)

    def next_deadline_ms(self) -> int | None:
        st = self._state
        if st["state"] in IN_PROGRESS:
            return self._next_poll
        return None


def _event_for(st: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    kind = st["state"]
    detail = {"version": st.get("version"), "target": st.get("target"),
              "from_slot": st.get("from_slot"), "to_slot": st.get("to_slot")}
    if kind == "failed":
        return ("update_refused", "warning",
                {**detail, "code": st.get("code"), "reason": (st.get("reason") or "")[:200]})
    if kind == "rolled_back":
        return ("update_rolled_back", "fault", {**detail, "reason": (st.get("reason") or "")[:200]})
    if kind == "committed":
        return "update_committed", "info", detail
    return f"update_{kind}", "info", detail


__all__ = ["KioskUpdates", "KioskView", "Tick", "check_args"]
