"""Privacy cells: is the booth occupied, and what its indicator LED shows.

Modules:

- ``occupancy``: the pure state machine (VACANT / OCCUPIED / LEAVING, stuck and flapping
  sensors) and the events sensor drivers produce (SensorReading, SensorAvailability);
- ``debounce``: the door reed switch's debouncer (injected clock);
- ``sensors``: PIR and reed switch on GPIO through gpiozero;
- ``ld2410``: the LD2410 radar's frame codec, driver and reconnecting worker;
- ``node``: the host side of the Pico cell node (firmware: boards/firmware/cellnode.py);
- ``indicator``: the LED outside the cell's door.

:class:`Cell`, here, is what the agent's main loop holds for each cell: it routes that
cell's sensor events through the door debouncers into the machine, drives the indicator,
and turns what happened into MQTT event notices and retained-state fields. Everything it
publishes names cells, sensors and states, never a person.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge.cells.debounce import ContactEdge, Debouncer
from edge.cells.occupancy import (CellState, Indication, OccupancyMachine, Output, SensorAvailability,
                                  SensorFault, SensorKind, SensorReading, SensorRecovered, Timings,
                                  Transition)
from edge.clock import Clock

log = logging.getLogger("hallkiosk.cells")

__all__ = ["Cell", "CellState", "CellUpdate", "ContactEdge", "Indication", "Notice", "SensorKind",
           "Timings"]


@dataclass(frozen=True, slots=True)
class Notice:
    """An event to publish: ``publisher.event(n.name, n.severity, n.subject, **n.detail)``."""
    name: str
    severity: str
    subject: str
    detail: dict


@dataclass(slots=True)
class CellUpdate:
    """What one input changed. ``vacated``: the cell just became VACANT, so the agent ends
    the session in it and wipes everything personal. ``changed``: state or faults changed,
    so the retained state (with :meth:`Cell.state_extra`) should be published again."""
    notices: list[Notice] = field(default_factory=list)
    vacated: bool = False
    changed: bool = False


class Cell:
    """One cell. ``sensors`` maps sensor names (as the drivers report them) to their kind;
    ``indicator`` is anything with ``show(Indication)`` (a CellIndicator), or None."""

    def __init__(self, cell_id: str, sensors: Mapping[str, SensorKind | str], *, clock: Clock,
                 timings: Timings | None = None, indicator=None, debounce_s: float = 0.05) -> None:
        self.id = cell_id
        self.clock = clock
        self.kinds = {name: SensorKind(kind) for name, kind in sensors.items()}
        self.machine = OccupancyMachine(cell_id, self.kinds, clock=clock, timings=timings)
        self.indicator = indicator
        self.debounce_s = debounce_s
        self._debouncers: dict[str, Debouncer] = {}
        self._unknown_logged: set[str] = set()
        self._show()

    # -- inputs from the main loop ---------------------------------------------------------
    def handle(self, event: object) -> CellUpdate | None:
        """Feed one event from the agent's queue. Returns None when the event is not for
        this cell (another cell's, or not a cell event at all)."""
        from edge.cells.node import NodeInfo  # here: the node driver pulls in pyserial

        if getattr(event, "cell", None) != self.id:
            return None
        if isinstance(event, NodeInfo):
            return CellUpdate([Notice("cell.node", "warning" if event.rebooted else "info",
                                      f"{self.id}.node",
                                      {"cell": self.id, "fw_version": event.fw_version,
                                       "uid": event.uid, "rebooted": event.rebooted})])
        if not isinstance(event, (SensorReading, ContactEdge, SensorAvailability)):
            return None
        if event.sensor not in self.kinds:
            if event.sensor not in self._unknown_logged:
                self._unknown_logged.add(event.sensor)
                log.warning("cell %s: event from unconfigured sensor %r ignored", self.id, event.sensor)
            return CellUpdate()
        if isinstance(event, SensorReading):
            if event.sensor in self._debouncers or self.kinds[event.sensor] is SensorKind.DOOR:
                # A steady level (read at start-up, or debounced by the node): the contact's
                # filter starts from it.
                self._debouncers[event.sensor] = Debouncer(event.value, clock=self.clock,
                                                           settle_s=self.debounce_s)
            return self._apply(self.machine.update(event.sensor, event.value))
        if isinstance(event, ContactEdge):
            deb = self._debouncers.get(event.sensor)
            if deb is None:
                deb = self._debouncers[event.sensor] = Debouncer(None, clock=self.clock,
                                                                 settle_s=self.debounce_s)
            level = deb.feed(event.closed)
            if level is None:
                return CellUpdate()
            return self._apply(self.machine.update(event.sensor, level))
        return self._apply(self.machine.set_available(event.sensor, event.available, event.detail))

    def set_session(self, active: bool) -> CellUpdate:
        """Whether a kiosk session is active in this cell (call on every session change)."""
        return self._apply(self.machine.set_session(active))

    def tick(self) -> CellUpdate:
        """Time passed: settle door debouncers, run the machine's timers."""
        outputs: list[Output] = []
        for name, deb in self._debouncers.items():
            level = deb.poll()
            if level is not None:
                outputs += self.machine.update(name, level)
        outputs += self.machine.tick()
        return self._apply(outputs)

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (deb.next_deadline() for deb in self._debouncers.values()) if d is not None]
        machine = self.machine.next_deadline()
        if machine is not None:
            deadlines.append(machine)
        return min(deadlines) if deadlines else None

    # -- what to publish -------------------------------------------------------------------
    @property
    def state(self) -> CellState:
        return self.machine.state

    def state_extra(self) -> dict[str, str]:
        """Fields for the retained state's ``extra`` (contract v1 flat object):
        ``cell.<id>`` = vacant|occupied|leaving, ``cell.<id>.faults`` = "pir:stuck,..." or ""."""
        faults = ",".join(f"{sensor}:{fault}" for sensor, kinds in sorted(self.machine.faults.items())
                          for fault in kinds)
        return {f"cell.{self.id}": self.machine.state.value, f"cell.{self.id}.faults": faults}

    def telemetry(self) -> dict[str, str | bool | None]:
        """One flat telemetry object for this cell (values: str, bool or None)."""
        body: dict[str, str | bool | None] = {"state": self.machine.state.value,
                                              "indication": self.machine.indication.value,
                                              "session": self.machine.session_active}
        faults = self.machine.faults
        for name, level in self.machine.levels().items():
            body[f"{name}"] = level
            body[f"{name}_fault"] = ",".join(faults.get(name, ())) or None
        return body

    def _apply(self, outputs: list[Output]) -> CellUpdate:
        update = CellUpdate()
        for out in outputs:
            update.changed = True
            if isinstance(out, Transition):
                update.notices.append(Notice("cell.state", "info", self.id,
                                             {"cell": self.id, "state": out.new.value,
                                              "previous": out.old.value, "reason": out.reason}))
                if out.new is CellState.VACANT:
                    update.vacated = True
            elif isinstance(out, SensorFault):
                update.notices.append(Notice("cell.sensor_fault", "fault", f"{self.id}.{out.sensor}",
                                             {"cell": self.id, "sensor": out.sensor, "fault": out.fault,
                                              "detail": out.detail}))
            elif isinstance(out, SensorRecovered):
                update.notices.append(Notice("cell.sensor_recovered", "info", f"{self.id}.{out.sensor}",
                                             {"cell": self.id, "sensor": out.sensor, "fault": out.fault}))
        self._show()
        return update

    def _show(self) -> None:
        if self.indicator is None:
            return
        try:
            self.indicator.show(self.machine.indication)
        except Exception:
            log.exception("cell %s: indicator could not be set", self.id)
