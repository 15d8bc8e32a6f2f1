"""Degraded modes as policy: from the parts' health to what the kiosk offers, and how it tells
the hall. Pure code: no I/O, no clock, so every mode and every recovery is a table test.

The policy (issue 6), in order:
- printer down (out of paper, cover open, offline, an error, gone) or the ticket store
  unusable: no tickets at all. The kiosk directs citizens to ``direct_to`` ("the nearest
  working kiosk", a sentence from config) and the hall sees ``out_of_service``.
- no way left to identify a citizen (the card reader down and no working QR device): no
  tickets either, for the same reason.
- card reader down: QR codes only. Camera and scanner both down: ID cards only. The kiosk
  still issues tickets and the hall sees ``degraded``.
- anything else not OK (paper near end, clock not synchronised, a part this module does not
  know): full service, ``degraded``, so ops see it before it becomes an outage.
- broker unreachable: full service from the durable outbox (edge.tickets): numbers come from
  the local store, so they stay unique; the outbox is flushed at the next connection. The
  hall sees the will's ``offline`` meanwhile, which is the truth from where it stands, so the
  broker never changes the status computed here.
Recovery needs no rule: when the parts report OK again, ``decide`` returns normal service.

Wiring: after every ``Health.apply`` / ``report`` that returned True, the agent calls
``decide(health.snapshot(), direct_to=cfg...)``; when the mode differs from the last one it
publishes the retained state with ``state_fields(mode, categories)`` merged into the body
(``since_ms`` = now when ``status`` changed) and updates the kiosk's indication.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edge.health import (BROKER, CAMERA, MAIN_LOOP, PRINTER, QR_SCANNER, READER, STORE,
                         ComponentHealth, Level)

ONLINE = "online"
DEGRADED = "degraded"
OUT_OF_SERVICE = "out_of_service"

#: Devices that read a citizen's QR code (an appointment or e-ID code); either one will do.
QR_DEVICES = (QR_SCANNER, CAMERA)
#: Parts without which no ticket can be issued.
TICKET_PARTS = (PRINTER, STORE)
#: Parts that never change the status: the main loop is the watchdog's business, and the
#: broker's absence is what the hall's 'offline' will already says.
_NOT_SERVICE_PARTS = (MAIN_LOOP, BROKER)

# The contract's limits (mqtt_topics.schemas): state.reason is text of at most 256 code
# points; extra is a flat object of at most 32 keys matching this pattern.
MAX_REASON = 256
MAX_EXTRA_KEYS = 32
_EXTRA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class ServiceMode:
    """What the kiosk offers now. ``reason`` says why it is not fully online (None when it
    is); ``direct_to`` is the sentence to show citizens when no ticket is offered."""

    status: str                     # "online" | "degraded" | "out_of_service"
    offers_tickets: bool
    card_ok: bool                   # an ID card can start a session
    qr_ok: bool                     # a QR code can start a session
    reason: str | None
    direct_to: str | None
    parts: tuple[tuple[str, str, str | None], ...] = ()   # (name, level, reason), sorted

    @property
    def normal(self) -> bool:
        return self.status == ONLINE


def decide(parts: Mapping[str, ComponentHealth], *, direct_to: str | None = None,
           out_of_service: str | None = None) -> ServiceMode:
    """The service mode for the parts' health (``Health.snapshot()``).

    ``parts`` holds the parts this kiosk has: a kiosk without a camera simply has no
    ``camera`` entry, and offering no QR then is its configuration, not a degradation.
    ``out_of_service`` is a reason to offer nothing whatever the parts say (an operator's
    command, or shutting down after SIGTERM).
    """
    service_parts = {n: c for n, c in parts.items() if n not in _NOT_SERVICE_PARTS}

    def working(name: str) -> bool:
        c = service_parts.get(name)
        return c is not None and c.level is not Level.DOWN

    def broken(name: str) -> bool:
        c = service_parts.get(name)
        return c is not None and c.level is Level.DOWN

    card_ok = working(READER)
    qr_installed = [n for n in QR_DEVICES if n in service_parts]
    qr_ok = any(working(n) for n in qr_installed)
    blockers = [n for n in TICKET_PARTS if broken(n)]
    if not (card_ok or qr_ok):
        # Nothing identifies a citizen; name the identification parts that are down.
        blockers += [n for n in (READER, *qr_installed) if broken(n)] or ["identification"]

    offers = out_of_service is None and not blockers
    # Worst first: what stops tickets (in policy order), then other faults, then warnings.
    rank = {name: i for i, name in enumerate(blockers)}
    not_ok = sorted((c for c in service_parts.values() if c.level is not Level.OK),
                    key=lambda c: (c.level is not Level.DOWN, rank.get(c.name, len(rank)), c.name))
    details = "; ".join(_describe(c) for c in not_ok)
    if out_of_service is not None:
        status, consequence = OUT_OF_SERVICE, _clean(out_of_service) or "out of service"
    elif not offers:
        status, consequence = OUT_OF_SERVICE, "no tickets"
        if "identification" in blockers:
            details = details or "no identification device"
    elif broken(READER) and qr_ok:
        status, consequence = DEGRADED, "QR codes only"
    elif qr_installed and not qr_ok and card_ok:
        status, consequence = DEGRADED, "ID cards only"
    elif not_ok:
        status, consequence = DEGRADED, None
    else:
        status, consequence = ONLINE, None

    if status == ONLINE:
        reason = None
    else:
        reason = ": ".join(p for p in (consequence, details) if p)[:MAX_REASON]
    shown = sorted((c.name, c.level.value, c.reason) for c in service_parts.values())
    return ServiceMode(status=status, offers_tickets=offers, card_ok=card_ok and offers,
                       qr_ok=qr_ok and offers, reason=reason,
                       direct_to=(_clean(direct_to) or None) if not offers and direct_to else None,
                       parts=tuple(shown))


def state_fields(mode: ServiceMode, services: Iterable[str]) -> dict:
    """The retained state's ``status``, ``reason``, ``services`` and ``extra`` for ``mode``
    (contract v1, mqtt_topics.schemas 'state'); the agent adds ``session``,
    ``agent_version`` and ``since_ms``. ``services`` are the configured category ids;
    none are listed while no ticket is offered."""
    extra: dict[str, str | bool] = {"tickets": mode.offers_tickets, "card": mode.card_ok,
                                    "qr": mode.qr_ok}
    if mode.direct_to is not None:
        extra["direct_to"] = mode.direct_to[:MAX_REASON]
    for name, level, reason in mode.parts:
        if len(extra) + (2 if reason else 1) > MAX_EXTRA_KEYS:
            break
        if not _EXTRA_KEY.fullmatch(name) or len(name) > 57:     # room for ".reason"
            continue
        extra[name] = level
        if reason:
            extra[f"{name}.reason"] = _clean(reason)[:MAX_REASON]
    return {"status": mode.status, "reason": mode.reason,
            "services": list(dict.fromkeys(services)) if mode.offers_tickets else [],
            "extra": extra}


def _describe(c: ComponentHealth) -> str:
    text = f"{c.name} {c.level.value}"
    return text + f" ({_clean(c.reason)})" if c.reason else text


def _clean(text: str | None) -> str:
    # state.reason is "text": no C0 controls but TAB/LF, no DEL, no lone surrogates. A reason
    # is one line anyway.
    if not text:
        return ""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
