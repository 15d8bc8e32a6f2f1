"""The deploy files: the systemd unit (parsed, and verified by systemd-analyze when this machine
has it), the udev rules, and install.sh staged into a temporary root twice (idempotence)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "hallkiosk.service"
RULES = REPO / "deploy" / "udev" / "99-hallkiosk.rules"
INSTALL = REPO / "deploy" / "install.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
#: `systemd-analyze security` scores 0 (locked down) to 10; 2.0 when this was written.
MAX_EXPOSURE = 3.0


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax, enough for our files: sections, repeated keys, comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line or line.endswith("\\"):
            raise AssertionError(f"line {n}: not a key=value in a section: {raw!r}")
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= is missing"
    return values[-1]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"not a simple time span: {value}"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


# -- the unit ---------------------------------------------------------------------------------
def test_unit_has_the_keys_unattended_operation_needs():
    unit = parse_unit(UNIT.read_text())
    svc, head = unit["Service"], unit["Unit"]
    assert one(svc, "Type") == "notify" and one(svc, "NotifyAccess") == "main"
    assert one(svc, "Restart") == "always"
    assert one(head, "StartLimitIntervalSec") == "0", "never give up restarting"
    watchdog = seconds(one(svc, "WatchdogSec"))
    assert 10 <= watchdog <= 120
    assert seconds(one(svc, "TimeoutStopSec")) >= 10
    assert one(svc, "StateDirectory") == "hallkiosk"
    assert one(svc, "User") == "hallkiosk"
    assert set(one(svc, "SupplementaryGroups").split()) >= {"dialout", "gpio", "video"}
    exec_start = one(svc, "ExecStart").split()
    assert exec_start[0] == "/opt/hallkiosk/bin/hallkiosk" and exec_start[1] == "agent"
    assert "-HUP" in one(svc, "ExecReload") and "$MAINPID" in one(svc, "ExecReload")
    assert one(svc, "StandardOutput") == "journal"
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_unit_hardening_keeps_the_hardware_reachable():
    svc = parse_unit(UNIT.read_text())["Service"]
    # Each of these would hide /dev/tty*, /dev/gpiochip* or /dev/video* from the agent.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "ProcSubset",
                "PrivateUsers", "DynamicUser"):
        assert key not in svc, f"{key}= cuts the kiosk off its hardware"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID"):
        assert one(svc, key) == "yes", key
    assert one(svc, "ProtectSystem") == "strict"
    assert one(svc, "CapabilityBoundingSet") == ""
    assert "AF_UNIX" in one(svc, "RestrictAddressFamilies"), "NOTIFY_SOCKET is AF_UNIX"


def test_unit_verifies_with_systemd_analyze(tmp_path):
    """`systemd-analyze verify` on the unit, with only ExecStart's program swapped for one
    that exists here (verify refuses a missing binary). Without systemd-analyze the key
    checks above are all there is, and this test says so with a warning."""
    if SYSTEMD_ANALYZE is None:
        warnings.warn("systemd-analyze not found: the unit was only parsed and key-checked")
        test_unit_has_the_keys_unattended_operation_needs()
        return
    program = Path(sys.executable).parent / "hallkiosk"
    if not program.exists():
        program = Path(sys.executable)
    copy = tmp_path / "hallkiosk.service"
    copy.write_text(UNIT.read_text().replace("/opt/hallkiosk/bin/hallkiosk", str(program)))
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_unit_exposure_score(tmp_path):
    if SYSTEMD_ANALYZE is None:
        warnings.warn("systemd-analyze not found: exposure not scored; hardening keys checked")
        test_unit_hardening_keeps_the_hardware_reachable()
        return
    done = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "offline" in done.stderr:
        warnings.warn("this systemd-analyze has no --offline (systemd < 250): hardening keys checked")
        test_unit_hardening_keeps_the_hardware_reachable()
        return
    m = re.search(r"Overall exposure level for hallkiosk\.service: ([0-9.]+)", done.stdout)
    assert m, done.stdout[-500:] + done.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE


# -- udev rules ------------------------------------------------------------------------------------
_PAIR = re.compile(r'\s*([A-Z_]+)(\{[A-Za-z0-9_]+\})?\s*(==|!=|\+=|:=|=)\s*"([^"]*)"\s*')


def rule_lines() -> list[list[tuple[str, str, str]]]:
    rules = []
    for raw in RULES.read_text().splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        pairs = []
        for part in raw.split(","):
            m = _PAIR.fullmatch(part)
            assert m, f"not a udev key/value: {part!r} in {raw!r}"
            pairs.append((m.group(1) + (m.group(2) or ""), m.group(3), m.group(4)))
        rules.append(pairs)
    return rules


def test_udev_rules_name_every_serial_role_stably():
    rules = rule_lines()
    gotos = {v for r in rules for k, _, v in r if k == "GOTO"}
    labels = {v for r in rules for k, _, v in r if k == "LABEL"}
    assert gotos and gotos <= labels
    links = {}
    for r in rules:
        keys = {k: (op, v) for k, op, v in r}
        if "SYMLINK" not in keys:
            continue
        assert keys["SYMLINK"][0] == "+="
        links[keys["SYMLINK"][1]] = keys
        assert keys["ATTRS{idVendor}"] and re.fullmatch(r"[0-9a-f]{4}", keys["ATTRS{idVendor}"][1])
        assert keys["GROUP"] == ("=", "dialout") and keys["MODE"] == ("=", "0660")
        assert keys["ENV{ID_MM_DEVICE_IGNORE}"] == ("=", "1"), "keep ModemManager off the port"
    assert set(links) == {"hallkiosk/idcard", "hallkiosk/printer", "hallkiosk/qrscanner",
                          "hallkiosk/cellnode"}


# -- install.sh ------------------------------------------------------------------------------------
def run_install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), "--src", str(REPO), *args],
                          capture_output=True, text=True, timeout=60)


def test_install_script_parses():
    done = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        done = subprocess.run([shellcheck, "-S", "warning", str(INSTALL)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def test_install_stages_everything_and_is_idempotent(tmp_path):
    root = tmp_path / "root"
    (root / "boot" / "firmware").mkdir(parents=True)
    (root / "boot" / "firmware" / "config.txt").write_text("arm_64bit=1\n")
    first = run_install(root, "--state-partition", "/data")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    for command in ("useradd --system --user-group", "usermod --append --groups dialout,gpio,video",
                    "-m venv --system-site-packages /opt/hallkiosk", "/opt/hallkiosk/bin/pip install",
                    "udevadm control --reload", "systemctl daemon-reexec",
                    "systemctl enable hallkiosk.service", "systemctl enable var-lib-hallkiosk.mount"):
        assert command in out, command
    etc = root / "etc"
    assert (etc / "systemd/system/hallkiosk.service").read_text() == UNIT.read_text()
    assert (etc / "udev/rules.d/99-hallkiosk.rules").read_bytes() == RULES.read_bytes()
    assert (etc / "hallkiosk/agent.toml.example").read_bytes() == \
        (REPO / "docs/agent.example.toml").read_bytes()
    watchdog = parse_unit((etc / "systemd/system.conf.d/50-hallkiosk-watchdog.conf").read_text())
    assert one(watchdog["Manager"], "RuntimeWatchdogSec") == "15"
    mount = parse_unit((etc / "systemd/system/var-lib-hallkiosk.mount").read_text())
    assert one(mount["Mount"], "What") == "/data/hallkiosk"
    assert one(mount["Mount"], "Where") == "/var/lib/hallkiosk"
    assert one(mount["Mount"], "Options") == "bind"
    dropin = parse_unit((etc / "systemd/system/hallkiosk.service.d/state-partition.conf").read_text())
    assert one(dropin["Unit"], "RequiresMountsFor") == "/var/lib/hallkiosk"
    assert (root / "data" / "hallkiosk").is_dir()
    assert not (etc / "hallkiosk" / "agent.toml").exists(), "never writes the real config"

    second = run_install(root, "--state-partition", "/data")
    assert second.returncode == 0, second.stderr
    assert "install: updated" not in second.stdout
    assert "udevadm" not in second.stdout and "daemon-reexec" not in second.stdout
    config = (root / "boot/firmware/config.txt").read_text()
    assert config.count("dtparam=watchdog=on") == 1


def test_install_mount_unit_verifies(tmp_path):
    root = tmp_path / "root"
    assert run_install(root, "--state-partition", "/data").returncode == 0
    if SYSTEMD_ANALYZE is None:
        warnings.warn("systemd-analyze not found: the mount unit was only parsed")
        return
    unit = root / "etc/systemd/system/var-lib-hallkiosk.mount"
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_install_prefix_and_existing_config(tmp_path):
    root = tmp_path / "root"
    (root / "etc" / "hallkiosk").mkdir(parents=True)
    (root / "etc" / "hallkiosk" / "agent.toml").write_text("# the kiosk's own\n")
    done = run_install(root, "--prefix", "/srv/hk", "--no-start")
    assert done.returncode == 0, done.stderr
    unit = parse_unit((root / "etc/systemd/system/hallkiosk.service").read_text())
    assert one(unit["Service"], "ExecStart").startswith("/srv/hk/bin/hallkiosk agent")
    assert "/srv/hk/bin/hallkiosk check-config" in done.stdout
    assert "systemctl restart" not in done.stdout                         # --no-start
    assert not (root / "etc/systemd/system/var-lib-hallkiosk.mount").exists()
    assert (root / "etc/hallkiosk/agent.toml").read_text() == "# the kiosk's own\n"


@pytest.mark.parametrize("args", [["--watchdog-sec", "30"], ["--watchdog-sec", "x"],
                                  ["--prefix", "relative"], ["--state-partition", "data"],
                                  ["--bogus"]])
def test_install_refuses_bad_options(tmp_path, args):
    done = run_install(tmp_path / "root", *args)
    assert done.returncode == 2
    assert not (tmp_path / "root").exists(), "nothing written before the options are checked"


def test_install_ab_slots_lays_out_slot_a_the_guard_and_the_drop_in(tmp_path):
    """--ab-slots: the venv becomes slot a, complete (its marker names the package's
    version), `current` points at it, the guard is the standard-library slots module and the
    unit's drop-in runs the guard, then current's agent; a second run keeps `current`
    wherever an update moved it."""
    import json
    import tomllib

    from edge.update.slots import Slots

    root = tmp_path / "root"
    (root / "etc" / "hallkiosk").mkdir(parents=True)
    (root / "etc" / "hallkiosk" / "agent.toml").write_text("# the kiosk's own\n")
    done = run_install(root, "--prefix", "/srv/hk", "--ab-slots", "--no-start")
    assert done.returncode == 0, done.stderr
    for command in ("-m venv --system-site-packages /srv/hk/slots/a",
                    "/srv/hk/slots/a/bin/pip install", "/srv/hk/slots/a/bin/python -P -m edge.footprint",
                    "chown -R hallkiosk:hallkiosk /srv/hk", "/srv/hk/slots/a/bin/hallkiosk check-config"):
        assert command in done.stdout, command
    prefix = root / "srv" / "hk"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert json.loads((prefix / "slots/a/hallkiosk-slot.json").read_text())["version"] == version
    slots = Slots(prefix)
    assert slots.active() == "a" and slots.version("a") == version
    assert (prefix / "lib/hallkiosk_slots.py").read_bytes() == \
        (REPO / "edge/update/slots.py").read_bytes()
    dropin = parse_unit((root / "etc/systemd/system/hallkiosk.service.d/ab-slots.conf").read_text())
    svc = dropin["Service"]
    assert svc["ExecStartPre"] == ["/usr/bin/python3 -I /srv/hk/lib/hallkiosk_slots.py guard --root /srv/hk"]
    assert svc["ExecStart"] == ["", "/srv/hk/current/bin/hallkiosk agent --config /etc/hallkiosk/agent.toml"]
    assert one(svc, "ReadWritePaths") == "/srv/hk"

    (prefix / "current").unlink()
    (prefix / "current").symlink_to("slots/b")       # an update switched to b
    again = run_install(root, "--prefix", "/srv/hk", "--ab-slots", "--no-start")
    assert again.returncode == 0, again.stderr
    assert (prefix / "current").readlink() == Path("slots/b")
    assert "install: updated" not in again.stdout


def test_install_without_ab_slots_writes_no_slot_layout(tmp_path):
    root = tmp_path / "root"
    done = run_install(root, "--no-start")
    assert done.returncode == 0, done.stderr
    assert not (root / "etc/systemd/system/hallkiosk.service.d/ab-slots.conf").exists()
    assert not (root / "opt/hallkiosk/current").exists()
