"""The kiosk's optional peripherals, built from config: the QR camera and scanner, the privacy
cell's sensors (PIR, door, LD2410 radar, Pico sensor node) and its indicator LED, and the
staff-call button. Each is handed its transport or pin factory here, the one place that
chooses real or emulated backends; hardware libraries are imported only for what is fitted.
"""

from __future__ import annotations

import logging
from typing import Callable

from edge.clock import Clock
from edge.config import AgentConfig
from edge.health import CAMERA, QR_SCANNER

log = logging.getLogger("hallkiosk.peripherals")


class Peripherals:
    def __init__(self, cfg: AgentConfig, *, sink: Callable[[object], None], clock: Clock,
                 pin_factory=None, frame_source=None) -> None:
        self.workers: list = []          # threads: start() / stop()
        self.closers: list = []
        self.parts: list[str] = []       # health components this kiosk has
        self.cell = None
        self.staff = None
        self._staff_panel = None
        try:
            self._build(cfg, sink, clock, pin_factory, frame_source)
        except Exception:
            self.close()
            raise

    def _build(self, cfg, sink, clock, pin_factory, frame_source) -> None:
        if cfg.camera.enabled or frame_source is not None:
            from edge.qr.frames import Picamera2Source
            from edge.qr.pipeline import QrPipeline
            from edge.qr.worker import QrCameraWorker

            source = frame_source or Picamera2Source(camera_num=cfg.camera.camera_num,
                                                     fps=cfg.camera.fps)
            pipeline = QrPipeline(clock=clock, repeat_window_s=cfg.camera.repeat_window_s,
                                  settle_s=cfg.camera.settle_s)
            self.workers.append(QrCameraWorker(source, pipeline, sink=sink, clock=clock))
            self.parts.append(CAMERA)
        if cfg.qr_scanner.port is not None:
            from edge.qr.scanner import QrScannerWorker

            sc = cfg.qr_scanner
            self.workers.append(QrScannerWorker(sc.port, sink=sink, terminator=sc.terminator,
                                                idle_gap_s=sc.idle_gap_s, max_len=sc.max_len,
                                                clock=clock, baudrate=sc.baudrate))
            self.parts.append(QR_SCANNER)
        if cfg.cell is not None:
            self._build_cell(cfg, sink, clock, pin_factory)
        board = cfg.board
        if board.staff_call_button is not None:
            from edge.staffcall import StaffCall, StaffCallPanel

            cell_id = cfg.cell.id if cfg.cell is not None else None
            self._staff_panel = StaffCallPanel({"kiosk": (board.staff_call_button, cell_id)},
                                               board.staff_call_led, sink=sink,
                                               pin_factory=pin_factory)
            self.closers.append(self._staff_panel.close)
            self.staff = StaffCall(clock=clock, repeat_after_s=cfg.staff_call.repeat_after_s,
                                   on_pending=self._staff_panel.show_pending)

    def _build_cell(self, cfg, sink, clock, pin_factory) -> None:
        from edge.cells import Cell
        from edge.cells.occupancy import SensorKind, Timings

        c = cfg.cell
        sensors: dict[str, SensorKind] = {}
        if c.pir:
            sensors["pir"] = SensorKind.MOTION
        if c.door:
            sensors["door"] = SensorKind.DOOR
        if c.radar_port:
            sensors["radar"] = SensorKind.PRESENCE
        if c.node_port:
            sensors["node_pir"] = SensorKind.MOTION
            sensors["node_door"] = SensorKind.DOOR
        indicator = None
        if c.indicator_pin is not None:
            from edge.cells.indicator import CellIndicator

            indicator = CellIndicator(c.indicator_pin, pin_factory=pin_factory)
            self.closers.append(indicator.close)
        timings = Timings(min_presence_s=c.min_presence_s, hold_s=c.hold_s,
                          hold_motion_only_s=c.hold_motion_only_s)
        self.cell = Cell(c.id, sensors, clock=clock, timings=timings, indicator=indicator)
        if c.pir or c.door:
            from edge.cells.sensors import CellGpioSensors

            occ = cfg.board.occupancy
            gpio = CellGpioSensors(c.id, sink=sink, pir_pin=occ.get("pir") if c.pir else None,
                                   door_pin=occ.get("door") if c.door else None,
                                   pin_factory=pin_factory)
            self.closers.append(gpio.close)
            self.workers.append(gpio)
        if c.radar_port:
            from edge.cells.ld2410 import RadarWorker

            self.workers.append(RadarWorker(c.radar_port, cell=c.id, sink=sink))
        if c.node_port:
            from edge.cells.node import CellNodeWorker

            self.workers.append(CellNodeWorker(c.node_port, cell=c.id, sink=sink,
                                               names={"pir": "node_pir", "door": "node_door"}))

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        for w in self.workers:
            stop = getattr(w, "stop", None)
            if stop is not None:
                try:
                    stop()
                except Exception:
                    log.debug("stopping %r failed", w, exc_info=True)
        self.close()

    def close(self) -> None:
        for close in self.closers:
            try:
                close()
            except Exception:
                log.debug("closing a peripheral failed", exc_info=True)
        self.closers.clear()
