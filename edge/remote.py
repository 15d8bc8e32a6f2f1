"""Remote commands from ops, after the CommandGate (edge.commands) accepted them.

Every command is answered on ``cmd/result``: ``accepted`` at once, then ``done`` or
``failed`` with a reason; refusals are answered by the gate's result plus a
``command_refused`` event. Commands (args in brackets):

- ``out_of_service`` [reason]: stop offering tickets (retained state says why);
- ``back_in_service``: undo it;
- ``reprint_last``: print the most recent ticket again, marked as a reprint;
- ``reload_config``: reread agent.toml (as SIGHUP; an invalid file is refused and kept out);
- ``diagnostics``: write a diagnostics bundle (no personal data) to the state dir and
  answer with its summary;
- ``restart``: exit cleanly; systemd (Restart=always) starts the agent again;
- ``staff_call_ack`` [call]: staff are on their way (clears the "call pending" LED);
- ``update`` [target, version, deadline_s]: install a signed release into the other slot
  and switch to it when idle (edge.update.kiosk; ``failed`` with ``busy`` while a citizen
  is in session or a ticket is unacknowledged, or when updates are not provisioned).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from typing import TYPE_CHECKING, Any, Callable

from edge.commands import Command
from edge.printer.escpos import TicketLayout
from hallkiosk import __version__
from hallkiosk.errors import DeviceError

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger("hallkiosk.remote")

#: Command name -> method name on RemoteCommands.
COMMANDS = ("out_of_service", "back_in_service", "reprint_last", "reload_config",
            "diagnostics", "restart", "staff_call_ack", "update")

Outcome = tuple[str, str | None, dict[str, Any]]     # status, reason, detail


class RemoteCommands:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def run(self, cmd: Command) -> Outcome:
        args = cmd.args or {}
        if cmd.name not in COMMANDS:
            return "failed", f"unknown command {cmd.name!r}", {"known": ",".join(COMMANDS)}
        if cmd.name == "staff_call_ack":
            return self._staff_call_ack(args, cmd.sender)
        if cmd.name == "update":
            return self._update(args, cmd.nonce)
        handler: Callable[[dict[str, Any]], Outcome] = getattr(self, f"_{cmd.name}")
        try:
            return handler(args)
        except DeviceError as exc:
            return "failed", str(exc)[:200], {}

    def _out_of_service(self, args: dict[str, Any]) -> Outcome:
        reason = str(args.get("reason") or "out of service by ops")[:120]
        self.agent.status.set_hold(reason)
        return "done", None, {"status": self.agent.status.mode.status}

    def _back_in_service(self, args: dict[str, Any]) -> Outcome:
        self.agent.status.set_hold(None)
        return "done", None, {"status": self.agent.status.mode.status}

    def _reprint_last(self, args: dict[str, Any]) -> Outcome:
        a = self.agent
        entry = a.store.last_ticket()
        if entry is None:
            return "failed", "no ticket issued yet", {}
        body = entry.body
        layout = TicketLayout(
            hall_name=a.cfg.hall.name, service_name=body["service_name"],
            ticket_number=entry.ticket_id,
            issued_at=time.strftime("%Y-%m-%d %H:%M", time.localtime(body["issued_at_ms"] / 1000)),
            waiting_ahead=body["waiting_ahead"], qr_data=entry.uid, notice="Reprint")
        a.printer.print_ticket(layout)
        a.publisher.event("ticket_reprinted", "info", "ticket-printer", ticket=entry.ticket_id)
        return "done", None, {"ticket": entry.ticket_id}

    def _reload_config(self, args: dict[str, Any]) -> Outcome:
        self.agent.reload()
        return "done", None, {"note": "reload queued; config_reloaded or config_reload_refused follows"}

    def _diagnostics(self, args: dict[str, Any]) -> Outcome:
        a = self.agent
        h = a.health.snapshot()
        report = {
            "agent_version": __version__, "python": platform.python_version(),
            "machine": platform.machine(), "device": a.cfg.kiosk.device_id,
            "config_digest": a.cfg.digest, "boot": a.boot_id,
            "mode": a.status.mode.status, "reason": a.status.mode.reason,
            "health": {n: {"level": c.level.value, "reason": c.reason} for n, c in h.items()},
            "outbox_depth": a.store.depth(), "link_connected": a.link.connected,
            "link_last_error": a.link.last_error,
        }
        out_dir = a.cfg.kiosk.state_dir / "diagnostics"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"diag-{int(a.clock.wall())}.json"
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        return "done", None, {"file": str(path)[:200], "mode": report["mode"],
                              "outbox_depth": report["outbox_depth"]}

    def _restart(self, args: dict[str, Any]) -> Outcome:
        self.agent.stop("restart requested by ops")
        return "done", None, {"note": "exiting; systemd restarts the agent"}

    def _update(self, args: dict[str, Any], nonce: str) -> Outcome:
        updates = self.agent.updates
        if updates is None:
            return "failed", "updates are not provisioned on this kiosk (no update.toml)", {}
        outcome = updates.request(args, self.agent.update_view(), nonce)
        if outcome[0] == "done":
            # The retained state says "preparing" before the answer goes out, so a rollout
            # that reads the answer never judges the kiosk by its previous update's state.
            self.agent.status.publish_state()
        return outcome

    def _staff_call_ack(self, args: dict[str, Any], sender: str) -> Outcome:
        staff = getattr(self.agent, "staff_call", None)
        if staff is None:
            return "failed", "this kiosk has no staff-call button", {}
        call = args.get("call")
        notice = staff.acknowledge(call if isinstance(call, str) else None, by=sender)
        if notice is None:
            return "failed", "no staff call pending", {}
        self.agent._notice(notice)
        return "done", None, {"call": notice.detail.get("call")}


__all__ = ["COMMANDS", "RemoteCommands"]
