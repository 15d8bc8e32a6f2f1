"""Update rollouts in waves: canaries first, then the rest, halting at the first sign of
trouble.

A wave is sent the signed ``update`` command (edge.update.kiosk). It passes when every
kiosk of it

- answered the command ``done`` (a ``busy`` answer — a citizen in session, a ticket
  unacknowledged — is sent again every ``retry_s`` until the wave's deadline),
- reports, in its retained state, the new version in ``update_state`` ``committed``
  (its own health gate passed: READY, broker link, reader and printer self-tests, outbox
  drained), and is online,
- stayed so for ``soak_s`` after committing, with a ticket success rate (tickets over
  tickets plus ``print_failed`` / ``ticket_refused`` events, since the wave began) of at
  least ``min_success_pct`` once it issued ``min_tickets``.

The rollout halts, and sends nothing more, when a kiosk of the wave fails any of these:
``rolled_back`` or ``failed`` (with the kiosk's refusal code), the command refused or
failed, the deadline passed, or the success rate fell. Kiosks already updated keep their
new slot (each one passed its own health check); ops decide whether to roll them back.

``Rollout`` is the decision alone (snapshots and results in, commands out), so tests drive
it with a manual clock; ``drive`` runs it against a monitor and an ops client.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from edge.clock import SYSTEM_CLOCK, Clock
from ops.fleet import KioskSnapshot

log = logging.getLogger("hallkiosk.rollout")


def plan_waves(devices: Sequence[str], *, canaries: Sequence[str] | int = 1,
               wave_pct: int = 25) -> tuple[tuple[str, ...], ...]:
    """Waves for ``devices``: the canaries (named, or the first N in sorted order), then
    waves of ``wave_pct`` % of the rest (at least one kiosk each)."""
    devices = sorted(set(devices))
    if isinstance(canaries, int):
        first = tuple(devices[:max(1, canaries)])
    else:
        unknown = set(canaries) - set(devices)
        if unknown:
            raise ValueError(f"canaries not in the fleet: {', '.join(sorted(unknown))}")
        first = tuple(sorted(canaries))
    rest = [d for d in devices if d not in first]
    if not 1 <= wave_pct <= 100:
        raise ValueError("wave_pct: 1..100")
    size = max(1, math.ceil(len(rest) * wave_pct / 100))
    return (first, *(tuple(rest[i:i + size]) for i in range(0, len(rest), size)))


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    target: str                       # the bundle's name in the signed targets
    version: str                      # what the kiosks must report once committed
    waves: tuple[tuple[str, ...], ...]
    hall: str
    wave_deadline_s: float = 900.0
    soak_s: float = 120.0
    retry_s: float = 30.0
    min_success_pct: int = 90
    min_tickets: int = 5
    health_deadline_s: int | None = None     # passed to the kiosks as deadline_s


@dataclass
class _Device:
    sent_at: float | None = None
    nonce: str | None = None
    answered: str | None = None          # done / failed / refused
    committed_at: float | None = None
    baseline: tuple[int, int] | None = None   # tickets, failures when the wave began
    outcome: str | None = None           # ok, or the reason it failed


@dataclass(frozen=True, slots=True)
class Decision:
    """One turn: commands to send now, and the rollout's state."""

    send: tuple[tuple[str, dict[str, Any], str], ...] = ()     # device, args, nonce
    state: str = "running"             # running | halted | done
    wave: int = 0
    reason: str | None = None


@dataclass
class Rollout:
    plan: RolloutPlan
    clock: Clock = SYSTEM_CLOCK
    wave: int = 0
    state: str = "running"
    reason: str | None = None
    devices: dict[str, _Device] = field(default_factory=dict)
    _wave_started: float | None = None

    def args(self) -> dict[str, Any]:
        a: dict[str, Any] = {"target": self.plan.target, "version": self.plan.version}
        if self.plan.health_deadline_s is not None:
            a["deadline_s"] = self.plan.health_deadline_s
        return a

    def on_result(self, device: str, body: Mapping[str, Any]) -> None:
        """A verified cmd_result from ``device`` (any; those not for our nonce are ignored)."""
        d = self.devices.get(device)
        if d is None or body.get("nonce") != d.nonce or body.get("status") == "accepted":
            return
        detail = body.get("detail") or {}
        if body.get("status") == "failed" and detail.get("code") == "busy":
            d.sent_at = self.clock.monotonic()      # resent after retry_s
            d.answered = "busy"
            return
        d.answered = str(body.get("status"))
        if d.answered != "done":
            d.outcome = f"{device}: command {d.answered}: {body.get('reason')}"

    def step(self, snapshots: Iterable[KioskSnapshot]) -> Decision:
        if self.state != "running":
            return Decision(state=self.state, wave=self.wave, reason=self.reason)
        now = self.clock.monotonic()
        snaps = {s.device: s for s in snapshots if s.hall == self.plan.hall}
        members = self.plan.waves[self.wave]
        send: list[tuple[str, dict[str, Any], str]] = []
        if self._wave_started is None:
            self._wave_started = now
            for dev in members:
                s = snaps.get(dev)
                self.devices[dev] = _Device(
                    baseline=(s.tickets, s.ticket_failures) if s else (0, 0))
        for dev in members:
            d = self.devices[dev]
            s = snaps.get(dev)
            if d.outcome is None and d.answered in (None, "busy") and (
                    d.sent_at is None or now - d.sent_at >= self.plan.retry_s):
                d.nonce = secrets.token_urlsafe(18)
                d.sent_at = now
                send.append((dev, self.args(), d.nonce))
            if d.outcome is None and s is not None:
                self._judge(dev, d, s, now)
        failed = [self.devices[dev].outcome for dev in members
                  if self.devices[dev].outcome not in (None, "ok")]
        if failed:
            return self._halt(failed[0], send)
        if all(self.devices[dev].outcome == "ok" for dev in members):
            log.info("wave %d passed: %s", self.wave, ", ".join(members))
            self.wave += 1
            self._wave_started = None
            if self.wave == len(self.plan.waves):
                self.state = "done"
                return Decision(tuple(send), "done", self.wave - 1)
            return Decision(tuple(send), "running", self.wave)
        if now - self._wave_started > self.plan.wave_deadline_s:
            late = [dev for dev in members if self.devices[dev].outcome is None]
            return self._halt(f"wave {self.wave} deadline passed: {', '.join(late)} not "
                              "committed", send)
        return Decision(tuple(send), "running", self.wave)

    def _judge(self, dev: str, d: _Device, s: KioskSnapshot, now: float) -> None:
        if s.update_state in ("rolled_back", "failed") and d.answered == "done":
            code = f" ({s.update_code})" if s.update_code else ""
            d.outcome = f"{dev}: update {s.update_state}{code}"
            return
        committed = (s.update_state == "committed" and s.agent_version == self.plan.version
                     and s.online)
        if not committed:
            if d.committed_at is not None:
                d.outcome = f"{dev}: lost its commit or went {s.status} after updating"
            return
        if d.committed_at is None:
            d.committed_at = now
        t0, f0 = d.baseline or (0, 0)
        tickets, failures = s.tickets - t0, s.ticket_failures - f0
        if tickets + failures >= self.plan.min_tickets and \
                100 * tickets < self.plan.min_success_pct * (tickets + failures):
            d.outcome = (f"{dev}: ticket success {tickets}/{tickets + failures} below "
                         f"{self.plan.min_success_pct}%")
            return
        if now - d.committed_at >= self.plan.soak_s:
            d.outcome = "ok"

    def _halt(self, reason: str, send: list) -> Decision:
        self.state, self.reason = "halted", reason
        log.warning("rollout halted in wave %d: %s", self.wave, reason)
        return Decision(tuple(send), "halted", self.wave, reason)


def drive(rollout: Rollout, *, send: Callable[[str, str, dict[str, Any], str], None],
          snapshots: Callable[[], Iterable[KioskSnapshot]],
          results: Callable[[], Iterable[tuple[str, Mapping[str, Any]]]],
          wait: Callable[[float], bool], turn_s: float = 2.0) -> Decision:
    """Run ``rollout`` until done or halted. ``send(device, name, args, nonce)`` publishes a
    signed command; ``results()`` yields new (device, cmd_result body); ``wait(s)`` returns
    True to stop early (Ctrl-C, a stop event)."""
    while True:
        for device, body in results():
            rollout.on_result(device, body)
        d = rollout.step(snapshots())
        for device, args, nonce in d.send:
            send(device, "update", args, nonce)
        if d.state != "running" or wait(turn_s):
            return d


class ClientResults:
    """``results`` for ``drive`` from a provisioning.opsclient.OpsClient: each verified
    answer to one of the rollout's nonces, once."""

    def __init__(self, rollout: Rollout, client: Any) -> None:
        self.rollout, self.client = rollout, client
        self._seen: set[tuple[str, str, int]] = set()

    def __call__(self) -> list[tuple[str, Mapping[str, Any]]]:
        out = []
        for dev, d in self.rollout.devices.items():
            if d.nonce is None:
                continue
            for v in self.client.results(d.nonce):
                key = (d.nonce, str(v.body["status"]), v.seq)
                if key not in self._seen:
                    self._seen.add(key)
                    out.append((dev, v.body))
        return out


def client_sender(client: Any, ttl_s: float = 120.0
                  ) -> Callable[[str, str, dict[str, Any], str], None]:
    """``send`` for ``drive``: a signed command through an OpsClient."""
    def send(device: str, name: str, args: dict[str, Any], nonce: str) -> None:
        client.send(device, name, args, nonce=nonce, ttl_s=ttl_s)
    return send


__all__ = ["ClientResults", "Decision", "Rollout", "RolloutPlan", "client_sender", "drive",
           "plan_waves"]
