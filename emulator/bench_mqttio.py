"""`make bench` (footprint part): mqtt-io beside the agent, same run, same broker.

mqtt-io (a generic GPIO/serial-to-MQTT bridge in Python) is installed into a venv of its own,
made by the bench and reused when present (``~/.cache/hallkiosk-bench/mqtt-io-venv``, or
``$HALLKIOSK_BENCH_CACHE``), with the same gpiozero, pyserial and paho-mqtt versions the agent
pins, and ``options.install_requirements: false`` so it installs nothing at run time.

Its config is the bench kiosk's hardware, as mqtt-io's schema (``config/config.schema.yml`` in
the package) expresses it: MQTT 3.1.1 (mqtt-io speaks no MQTT 5) over TLS with the kiosk's
client certificate to the hall's Mosquitto; gpiozero inputs for the service button and the
staff-call button (pull-up, interrupt on both edges, as the agent's ``Button`` callbacks) and
outputs for the service LED, status LED and staff-call LED; a serial stream on each of its own
emulated ID-card reader and printer ptys, read every 0.3 s (the agent's poll interval). GPIO
runs on gpiozero's MockFactory (``GPIOZERO_PIN_FACTORY=mock``), as the agent's does.

What it does not do, and the agent does: GA 467 and ESC/POS protocols, Ed25519 signing,
certificate checks, the SQLite outbox, sessions and tickets. Its figure is what the same
libraries cost with a different, generic program around them, not a like-for-like agent.
The broker's ACL drops its publishes outside the kiosk's topics (MQTT 3.1.1: silently): its
idle memory does not depend on them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from emulator.broker import end_process

#: What the bench installs; the hardware and MQTT libraries at the agent's own pins.
MQTTIO_VERSION = "2.7.0"
MQTTIO_REQUIREMENTS = (f"mqtt-io=={MQTTIO_VERSION}", "gpiozero==2.0.1", "pyserial==3.5", "paho-mqtt==2.2.0")


class MqttIoUnavailable(RuntimeError):
    """mqtt-io could not be installed or started; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("HALLKIOSK_BENCH_CACHE",
                               Path.home() / ".cache" / "hallkiosk-bench"))


def ensure_venv(root: Path | None = None) -> Path:
    """The venv's python, creating the venv and installing MQTTIO_REQUIREMENTS when the
    recorded requirement set differs. Raises MqttIoUnavailable with pip's last lines."""
    venv = (root or cache_dir()) / "mqtt-io-venv"
    python = venv / "bin" / "python"
    stamp = venv / "hallkiosk-requirements.txt"
    wanted = "\n".join(MQTTIO_REQUIREMENTS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, text=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MQTTIO_REQUIREMENTS],
                       check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        lines = [ln for ln in str(detail).splitlines() if "is ignored" not in ln]
        raise MqttIoUnavailable(f"installing {' '.join(MQTTIO_REQUIREMENTS)} into {venv} "
                                f"failed: {' | '.join(lines[-3:])}") from exc
    stamp.write_text(wanted)
    return python


def mqttio_config(*, host: str, port: int, client_id: str, topic_prefix: str, ca: str,
                  cert: str, key: str, inputs: dict[str, int], outputs: dict[str, int],
                  streams: dict[str, str], read_interval_s: float = 0.3) -> str:
    """mqtt-io's YAML for one kiosk's hardware (keys from its config schema)."""
    lines = ["mqtt:", f"  host: {host}", f"  port: {port}", f"  client_id: {client_id}",
             f"  topic_prefix: {topic_prefix}", "  status_topic: status", "  keepalive: 10",
             '  protocol: "3.1.1"', "  tls:", "    enabled: true", f'    ca_certs: "{ca}"',
             f'    certfile: "{cert}"', f'    keyfile: "{key}"',
             "options:", "  install_requirements: false",
             "gpio_modules:", "  - name: pins", "    module: gpiozero",
             "digital_inputs:"]
    for name, pin in inputs.items():
        lines += [f"  - name: {name}", "    module: pins", f"    pin: {pin}",
                  "    pullup: true", "    interrupt: both"]
    lines.append("digital_outputs:")
    for name, pin in outputs.items():
        lines += [f"  - name: {name}", "    module: pins", f"    pin: {pin}"]
    lines.append("stream_modules:")
    for name, dev in streams.items():
        lines += [f"  - name: {name}", "    module: serial", f'    device: "{dev}"',
                  "    baud: 115200", f"    read_interval: {read_interval_s}"]
    return "\n".join(lines) + "\n"


def kiosk_config(hall, kiosk) -> str:
    """The YAML for an EmulatedKiosk: the same pins the agent's bench kiosk drives."""
    b = kiosk.board
    used = {btn for _, _, btn in kiosk.services}
    inputs = {f"button_{r.lower()}": p for r, p in b.service_buttons.items() if r in used}
    outputs = {f"led_{r.lower()}": p for r, p in b.service_leds.items() if r in used}
    if b.status_led is not None:
        outputs["status_led"] = b.status_led
    if b.staff_call_button is not None:
        inputs["staff_call"] = b.staff_call_button
    if b.staff_call_led is not None:
        outputs["staff_call_led"] = b.staff_call_led
    ident = kiosk.identity
    return mqttio_config(host="127.0.0.1", port=hall.broker.port, client_id=kiosk.device_id,
                         topic_prefix=f"hall/{hall.hall_id}/kiosk/{kiosk.device_id}/io",
                         ca=str(hall.pki.chain_file), cert=str(ident.cert_path),
                         key=str(ident.key_path), inputs=inputs, outputs=outputs,
                         streams={"idcard": str(kiosk.reader.path),
                                  "printer": str(kiosk.printer.path)})


@dataclass
class MqttIoProcess:
    proc: subprocess.Popen
    log_path: Path
    label: str

    def wait_connected(self, timeout_s: float = 20.0) -> bool:
        """Until its log says it subscribed (connected over TLS), or it exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if "Subscribed to topic" in self.log_path.read_text(errors="replace"):
                return True
            time.sleep(0.1)   # another process's log file: no event to wait on
        return False

    def stop(self) -> None:
        end_process(self.proc)


def spawn(python: Path, config: str, workdir: Path, *, label: str) -> MqttIoProcess:
    """Start mqtt-io on ``config``. It runs without -OO, unlike the agent: Cerberus 1.3, its
    config validator, reads its rule schemas from docstrings and raises RuntimeError at import
    under PYTHONOPTIMIZE=2."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"{label}.yml"
    conf.write_text(config)
    log = workdir / f"{label}.log"
    env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock")
    env.pop("PYTHONOPTIMIZE", None)
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(python), "-m", "mqtt_io", str(conf)], env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    return MqttIoProcess(proc, log, label)


# -- reading memory and printing the comparison -------------------------------------------------
def parse_kib_fields(text: str, fields: tuple[str, ...]) -> dict[str, int]:
    """``Name:  1234 kB`` lines (/proc/<pid>/status, smaps_rollup) -> {name: KiB}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name in fields:
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0])
    return out


def memory_kib(pid: int) -> dict[str, int | None]:
    """VmRSS, RssAnon, RssFile (/proc/<pid>/status) and Pss (smaps_rollup) in KiB."""
    out: dict[str, int | None] = dict.fromkeys(("VmRSS", "RssAnon", "RssFile", "Pss"))
    out.update(parse_kib_fields(Path(f"/proc/{pid}/status").read_text(),
                                ("VmRSS", "RssAnon", "RssFile")))
    try:
        out.update(parse_kib_fields(Path(f"/proc/{pid}/smaps_rollup").read_text(), ("Pss",)))
    except OSError:
        pass
    return out


def side_by_side(agent: dict, other: dict | None, note: str | None = None) -> str:
    """The two processes' idle memory as a table, MiB; ``-`` where a figure is missing."""
    def cell(d: dict | None, key: str) -> str:
        v = None if d is None else d.get(key)
        return "-" if v is None else f"{v / 1024:.1f}"

    rows = [f"{'idle MiB':<10}{'hallkiosk':>12}{'mqtt-io':>10} {MQTTIO_VERSION}"]
    for label, key in (("RSS", "VmRSS"), ("PSS", "Pss"), ("anon", "RssAnon"),
                       ("file", "RssFile")):
        rows.append(f"{label:<10}{cell(agent, key):>12}{cell(other, key):>10}")
    text = "\n".join(rows)
    return f"{text}\n({note})" if note else text


def start_mqttio(hall, workdir: Path) -> MqttIoProcess:
    """Install (or reuse) mqtt-io, add a kiosk of its own to ``hall`` (its own certificate
    and ptys) and start mqtt-io on it; raises MqttIoUnavailable if any step fails."""
    python = ensure_venv()
    kiosk = hall.add_kiosk("mqttio1", services=(("A", "Citizen card", "A"),))
    kiosk.printer.out_dir = None
    proc = spawn(python, kiosk_config(hall, kiosk), workdir, label="mqtt-io")
    if not proc.wait_connected(30):
        proc.stop()
        tail = proc.log_path.read_text(errors="replace").splitlines()[-3:]
        raise MqttIoUnavailable(f"mqtt-io did not connect: {' | '.join(tail)}")
    return proc
