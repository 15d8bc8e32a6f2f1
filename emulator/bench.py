"""`make bench`: the backbone's figures, measured on this machine.

- tap-to-ticket: card presented at the emulated reader -> verified ticket stored by the hall's
  consumer, over >= 200 tickets, p50/p99 (agent in its own process, single-service kiosk so the
  figure is the machine's latency and not a scripted button delay; a second run with a
  button press measures button -> verified ticket);
- the idle agent's RSS and CPU (30 s window, from /proc), and beside it, in the same window
  on the same broker, mqtt-io's with a comparable GPIO and serial config (emulator.bench_mqttio);
- start to ready (process start -> "ready" log line), median of 5;
- a QR code appearing at the camera -> verified appointment ticket at the consumer;
- the QR pipeline against raw pyzbar (emulator.bench_qr) and the ops monitor's verified
  ingest rate with N monitor processes on an MQTT 5 shared subscription (default 1 and 2), per
  process and against a city's 2,000 msg/s (emulator.bench_ops).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import threading
import time
from pathlib import Path

from emulator.idcard import Card
from emulator.kiosk import EmulatedHall

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])       # utime + stime


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def _wait_line(proc, needle: str, timeout_s: float) -> float | None:
    """Read the agent's stdout until a line contains ``needle``; returns the monotonic time."""
    result: queue.Queue[float | None] = queue.Queue()

    def reader() -> None:
        for line in proc.stdout:
            if needle in line:
                result.put(time.monotonic())
                break
        else:
            result.put(None)
        for _ in proc.stdout:       # keep draining so the agent never blocks on a full pipe
            pass

    threading.Thread(target=reader, daemon=True).start()
    try:
        return result.get(timeout=timeout_s)
    except queue.Empty:
        return None


def run_bench(out: Path, tickets: int = 200, ops_procs: tuple[int, ...] = (1, 2)) -> int:
    """Every figure; ``ops_procs``: the monitor process counts the ops ingest measures."""
    out.mkdir(parents=True, exist_ok=True)
    # A fresh hall each run (its CA refuses to be overwritten, rightly).
    shutil.rmtree(out / "hall", ignore_errors=True)
    shutil.rmtree(out / "ops", ignore_errors=True)
    figures: dict[str, object] = {}
    poll_s = 0.3
    with EmulatedHall(out / "hall") as hall:
        arrivals: dict[str, float] = {}
        cond = threading.Condition()

        def on_ticket(v, new) -> None:
            with cond:
                arrivals[v.body["ticket_uid"]] = time.monotonic()
                cond.notify_all()

        hall.start_consumer(on_ticket=on_ticket)

        # -- start to ready ---------------------------------------------------------------
        kiosk = hall.add_kiosk("bench1", services=(("A", "Citizen card", "A"),), poll_interval_s=poll_s)
        # The emulated printer's PNG of each ticket is drawn in THIS process, where it competes
        # for the GIL with the emulated reader and the consumer the latency is measured through
        # (about 10 ms at the p99 here); it is no part of a kiosk, so the bench goes without it.
        kiosk.printer.out_dir = None
        starts = []
        for _ in range(5):
            t0 = time.monotonic()
            proc = kiosk.spawn_agent()
            t1 = _wait_line(proc, "msg=\"ready", 10)
            proc.terminate()
            proc.wait(10)
            if t1 is not None:
                starts.append(t1 - t0)
        figures["start_to_ready_s_median"] = round(statistics.median(starts), 3) if starts else None

        # -- tap to ticket ----------------------------------------------------------------
        proc = kiosk.spawn_agent()
        _wait_line(proc, "broker link up", 10)
        lat = []
        for i in range(tickets):
            uid_count = len(arrivals)
            card = Card.valid()
            kiosk.reader.present(card)
            t_present = kiosk.reader.present_time
            with cond:
                if not cond.wait_for(lambda: len(arrivals) > uid_count, timeout=5):
                    print(f"ticket {i} did not arrive")
                    continue
                t_done = max(arrivals.values())
            lat.append((t_done - t_present) * 1000)
            # Next citizen arrives at a random moment relative to the poll cycle.
            time.sleep((i * 0.037) % poll_s)
        figures["tap_to_ticket_ms"] = {
            "n": len(lat), "poll_interval_ms": poll_s * 1000,
            "p50": round(_pct(lat, 50), 1), "p99": round(_pct(lat, 99), 1), "max": round(max(lat), 1),
            "target_p99_ms": poll_s * 1000 + 25}

        # -- idle RSS and CPU, beside mqtt-io on the same broker ---------------------------
        from emulator.bench_mqttio import MqttIoUnavailable, memory_kib, start_mqttio

        try:
            mqttio = start_mqttio(hall, out / "mqtt-io")
            mqttio_note = None
        except MqttIoUnavailable as exc:
            mqttio, mqttio_note = None, f"mqtt-io not measured: {exc}"
            print(f"bench: {mqttio_note}")
        time.sleep(2)
        pids = [proc.pid] + ([mqttio.proc.pid] if mqttio else [])
        c0, w0 = [_cpu_ticks(p) for p in pids], time.monotonic()
        time.sleep(30)          # CLK_TCK is 100 Hz: a long window for a 0.1 % resolution
        c1, w1 = [_cpu_ticks(p) for p in pids], time.monotonic()
        cpu = [round(100 * (b - a) / CLK_TCK / (w1 - w0), 2) for a, b in zip(c0, c1)]
        figures["idle_cpu_percent_of_one_core"] = cpu[0]
        figures["idle_rss_mib"] = round(_rss_kib(proc.pid) / 1024, 1)
        # Where it goes: heap and other private memory, vs mapped files (libpython, the
        # OpenSSL and cryptography libraries, other extension modules).
        figures["idle_rss_anon_mib"] = round(_status_kib(proc.pid, "RssAnon") / 1024, 1)
        figures["idle_rss_file_mib"] = round(_status_kib(proc.pid, "RssFile") / 1024, 1)
        agent_mem = memory_kib(proc.pid)
        other_mem = memory_kib(mqttio.proc.pid) if mqttio else None
        figures["idle_memory_kib"] = {"hallkiosk_agent": agent_mem, "mqtt_io": other_mem,
                                      "mqtt_io_cpu_percent_of_one_core":
                                          cpu[1] if mqttio else None,
                                      "note": mqttio_note}
        if mqttio:
            mqttio.stop()
        proc.terminate()
        proc.wait(10)

        # -- QR code appearing at the camera -> verified priority ticket at the consumer ---
        qk = hall.add_kiosk("bench2", qr=True)
        agent = qk.start_agent()
        agent.link.wait_connected(10)
        qlat = []
        for i in range(20):
            before = len(arrivals)
            qk.camera.show(hall.booking.appointment("A", start_s=int(time.time()) + 600))
            with cond:
                ok = cond.wait_for(lambda: len(arrivals) > before, timeout=5)
                t_done = max(arrivals.values()) if ok else None
            shown = qk.camera.code_since_mono
            qk.camera.hide()
            if t_done is not None and shown is not None:
                qlat.append((t_done - shown) * 1000)
            time.sleep(0.3)
        qk.stop_agent()
        if qlat:
            figures["qr_code_to_ticket_ms"] = {"n": len(qlat), "p50": round(_pct(qlat, 50), 1),
                                               "p90": round(_pct(qlat, 90), 1),
                                               "max": round(max(qlat), 1)}
    from emulator.bench_ops import run_ops_bench
    from emulator.bench_qr import run_qr_bench

    figures["qr_pipeline"] = run_qr_bench()
    figures["ops_ingest"] = run_ops_bench(out / "ops", procs=ops_procs)
    print(json.dumps(figures, indent=2))
    (out / "bench.json").write_text(json.dumps(figures, indent=2))
    print()
    print(summary(figures))
    return 0


def summary(figures: dict) -> str:
    """The headline figures as a few lines of text (after the JSON)."""
    from emulator.bench_mqttio import side_by_side

    lines = []
    mem = figures.get("idle_memory_kib") or {}
    if mem.get("hallkiosk_agent"):
        lines.append(side_by_side(mem["hallkiosk_agent"], mem.get("mqtt_io"), mem.get("note")))
        lines.append("")
    lines += ops_summary(figures.get("ops_ingest") or {})
    t = figures.get("tap_to_ticket_ms") or {}
    if t:
        lines.append(f"tap to ticket: p50 {t['p50']} ms, p99 {t['p99']} ms over {t['n']} "
                     f"(card poll {t['poll_interval_ms']:.0f} ms)")
    return "\n".join(lines)


def ops_summary(ops: dict) -> list[str]:
    """The ops ingest lines: msg/s for each process count, per process and scaling, one
    process against a city's load, and a warning for every stage that lost or rejected
    messages (its rate counts only what verified)."""
    from emulator.bench_ops import CITY_LOAD_PER_S

    stages = ops.get("processes") or {}
    one = (stages.get("1") or {}).get("per_s")
    if not one:
        return []
    lines = [f"ops ingest, verified msg/s, best of {ops.get('repeats', '?')} runs, "
             f"{ops.get('cpus')} cores shared with the broker and the load generator:"]
    scaling = ops.get("scaling_vs_one_process") or {}
    for n, st in sorted(stages.items(), key=lambda kv: int(kv[0])):
        per_process = ", ".join("-" if r is None else f"{r:,}"
                                for r in st.get("per_process_per_s", []))
        ratio = f"; scaling {scaling[n]}x" if scaling.get(n) is not None else ""
        lines.append(f"  {n} process{'es' if n != '1' else ''}: {st.get('per_s') or 0:,} "
                     f"(per process {per_process}){ratio}")
    city = ops.get("city_load_per_s") or CITY_LOAD_PER_S
    margin = ops.get("one_process_vs_city_load", round(one / city, 2))
    lines.append(f"one process against a city's load ({city:,} msg/s): {margin}x"
                 + ("" if margin > 1 else " (does NOT clear it)"))
    named = [("one_process_2_workers", ops.get("one_process_2_workers") or {})]
    named += [(f"{n} process{'es' if n != '1' else ''}", st) for n, st in stages.items()]
    for name, st in named:
        lost, rejected = st.get("runs_unverified") or [], st.get("runs_rejected") or []
        if any(lost) or any(rejected):
            lines.append(f"WARNING: {name} did not verify every message: unverified per run "
                         f"{lost}, rejected per run {rejected} (best run's reasons "
                         f"{st.get('rejected')})")
    if (ops.get("cpus") or 0) <= 2 and len(stages) > 1:
        lines.append("note: on 2 cores the publisher and Mosquitto compete with the "
                     "monitors, so the multi-process figures are bounded by the CPUs, not MQTT")
    return lines
