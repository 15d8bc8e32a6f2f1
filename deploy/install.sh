#!/usr/bin/env bash
# Install the hallkiosk agent on a kiosk (Raspberry Pi OS / Debian 12 or later), as root.
#
#   sudo deploy/install.sh [--state-partition /data] [--prefix /opt/hallkiosk]
#                          [--watchdog-sec 15] [--python python3] [--no-start] [--ab-slots]
#
# Idempotent: run it again after copying a new release; it changes only what differs and
# never touches /etc/hallkiosk/agent.toml, the hall secret or the device key.
#
# What it does, in order (docs/unattended.md explains each choice):
#   1. system user "hallkiosk" in groups dialout, gpio, video;
#   2. a venv in PREFIX with --system-site-packages (picamera2 and libcamera come from apt,
#      they are not on PyPI), and the package with its pinned dependencies; with
#      --ab-slots the venv is slot a of PREFIX/slots/{a,b} instead, with PREFIX/current,
#      the boot guard and the unit's ab-slots.conf drop-in (signed updates, docs/updates.md);
#   3. /etc/hallkiosk (root:hallkiosk 0750) with agent.toml.example next to your agent.toml;
#   4. the systemd unit, and with --state-partition a bind mount of DIR/hallkiosk on
#      /var/lib/hallkiosk, so the durable state survives an overlay (read-only) root;
#   5. the udev rules for stable serial names (/dev/hallkiosk/*);
#   6. the hardware watchdog: RuntimeWatchdogSec for systemd, dtparam=watchdog=on on a Pi;
#   7. enable the unit; start it once agent.toml exists.
#
# Run it with the overlay root OFF (raspi-config > Performance > Overlay file system), then
# turn the overlay on: with it on, everything written here would be gone after a reboot.
#
# --root DIR stages the files into an image tree (or a test directory) instead of /; the
# commands that need the running target (useradd, pip, chown, udevadm, systemctl) are then
# listed, not run. --dry-run lists them on the live system and writes nothing.
set -euo pipefail

PREFIX=/opt/hallkiosk
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=/
STATE_PARTITION=
WATCHDOG_SEC=15
PYTHON=python3
DRY_RUN=0
START=1
AB=0
USER_NAME=hallkiosk
GROUPS_NEEDED=(dialout gpio video)

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --src) SRC=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --state-partition) STATE_PARTITION=$2; shift 2 ;;
        --watchdog-sec) WATCHDOG_SEC=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-start) START=0; shift ;;
        --ab-slots) AB=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 >&2 ;;
    esac
done

case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;; esac
if [ -n "$STATE_PARTITION" ]; then
    case "$STATE_PARTITION" in /*) ;; *) echo "install.sh: --state-partition must be absolute" >&2; exit 2 ;; esac
fi
# The Pi's watchdog (bcm2835-wdt) cannot count beyond about 15 s; systemd would clamp it.
if ! [[ "$WATCHDOG_SEC" =~ ^[0-9]+$ ]] || [ "$WATCHDOG_SEC" -lt 5 ] || [ "$WATCHDOG_SEC" -gt 15 ]; then
    echo "install.sh: --watchdog-sec must be a whole number of seconds from 5 to 15" >&2; exit 2
fi
ROOT=${ROOT%/}          # "/" becomes "", so "$ROOT/etc" is "/etc"
EXEC=1          # run commands on this system?
WRITE=1         # write files (under ROOT)?
if [ -n "$ROOT" ]; then EXEC=0; fi
if [ "$DRY_RUN" = 1 ]; then
    EXEC=0
    [ -n "$ROOT" ] || WRITE=0
fi
if [ "$EXEC" = 1 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or with --dry-run / --root DIR)" >&2; exit 1
fi
for f in deploy/systemd/hallkiosk.service deploy/systemd/hallkiosk-ab-slots.conf \
         deploy/udev/99-hallkiosk.rules docs/agent.example.toml pyproject.toml edge/update/slots.py; do
    [ -f "$SRC/$f" ] || { echo "install.sh: $SRC is not a hallkiosk source tree (no $f)" >&2; exit 2; }
done

say() { printf 'install: %s\n' "$*"; }
# A command that changes the target system: run it, or list it.
run() {
    if [ "$EXEC" = 1 ]; then "$@"; else printf 'would run: %s\n' "$*"; fi
}

# install_file MODE SOURCE TARGET: copy when missing or different; set CHANGED=1 if copied.
install_file() {
    local mode=$1 src=$2 dst=$ROOT$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        say "unchanged $3"
        return 0
    fi
    CHANGED=1
    if [ "$WRITE" = 1 ]; then
        install -D -m "$mode" "$src" "$dst"
        say "updated $3"
    else
        say "would update $3"
    fi
}

# write_file MODE TARGET < content
write_file() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    install_file "$1" "$tmp" "$2"
    rm -f "$tmp"
}

has_group() { grep -q "^$1:" "$ROOT/etc/group" 2>/dev/null; }
has_user() { grep -q "^$1:" "$ROOT/etc/passwd" 2>/dev/null; }
in_group() { grep -Eq "^$2:[^:]*:[^:]*:(.*,)?$1(,|\$)" "$ROOT/etc/group" 2>/dev/null; }

# -- 1. user and groups ------------------------------------------------------------------
for g in "${GROUPS_NEEDED[@]}"; do
    # Raspberry Pi OS has all three; plain Debian has no gpio group (its udev rules then
    # leave /dev/gpiochip* to root, and the kiosk needs a rule of its own for GPIO).
    has_group "$g" || run groupadd --system "$g"
done
if has_user "$USER_NAME"; then
    say "user $USER_NAME exists"
else
    run useradd --system --user-group --home-dir /var/lib/hallkiosk --no-create-home \
        --shell /usr/sbin/nologin --comment "hallkiosk agent" "$USER_NAME"
fi
missing=()
for g in "${GROUPS_NEEDED[@]}"; do in_group "$USER_NAME" "$g" || missing+=("$g"); done
if [ ${#missing[@]} -gt 0 ]; then
    run usermod --append --groups "$(IFS=,; echo "${missing[*]}")" "$USER_NAME"
fi

# -- 2. venv and package -------------------------------------------------------------------
# With --ab-slots (docs/updates.md) the venv is slot a of PREFIX/slots/{a,b}, `current`
# points at it and signed updates install into the other slot; without, PREFIX is the venv.
VENV=$PREFIX
if [ "$AB" = 1 ]; then VENV=$PREFIX/slots/a; fi
if [ -x "$ROOT$VENV/bin/python" ]; then
    say "venv $VENV exists"
else
    run "$PYTHON" -m venv --system-site-packages "$VENV"
fi
# Pinned versions come from the package's own metadata: the fleet runs what was tested.
run "$VENV/bin/pip" install --disable-pip-version-check --no-cache-dir --upgrade "$SRC"
# The unit runs the agent with PYTHONOPTIMIZE=2 (no docstrings: 1.3 MiB less resident) and
# PYTHONDONTWRITEBYTECODE on a read-only root, so its bytecode is written here, once: the
# standard modules it imports (Debian ships only -O0 bytecode) and everything in the venv's
# site-packages and the system's dist-packages (pip, too, compiles at -O0 only). -P: the
# installed package, not a checkout in the current directory. After a Python upgrade from
# apt, run install.sh again (dpkg does not know these files; the agent still runs without
# them, compiling at each start).
run "$VENV/bin/python" -P -m edge.footprint --precompile

# -- 2b. A/B slots (--ab-slots) ----------------------------------------------------------------
if [ "$AB" = 1 ]; then
    # Slot a is complete once its marker exists (edge/update/slots.py); `current` is set only
    # when missing: after an update it may rightly point at slot b. The boot guard is a copy
    # of slots.py (standard library only) run by the system Python before every start.
    VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -n 1)
    printf '{"bundle": "deploy/install.sh", "sha256": "-", "version": "%s"}\n' "$VERSION" \
        | write_file 0644 "$VENV/hallkiosk-slot.json"
    install_file 0644 "$SRC/edge/update/slots.py" "$PREFIX/lib/hallkiosk_slots.py"
    if [ -L "$ROOT$PREFIX/current" ]; then
        say "current -> $(readlink "$ROOT$PREFIX/current")"
    elif [ "$WRITE" = 1 ]; then
        ln -s slots/a "$ROOT$PREFIX/current"
        say "current -> slots/a"
    else
        say "would link current -> slots/a"
    fi
    # The agent writes its update state, downloads and the other slot under PREFIX.
    run chown -R "$USER_NAME:$USER_NAME" "$PREFIX"
fi

# -- 3. config directory ---------------------------------------------------------------------
if [ "$WRITE" = 1 ]; then install -d -m 0750 "$ROOT/etc/hallkiosk"; fi
run chown root:"$USER_NAME" /etc/hallkiosk
run chmod 0750 /etc/hallkiosk
CHANGED=0
install_file 0640 "$SRC/docs/agent.example.toml" /etc/hallkiosk/agent.toml.example

# -- 4. systemd unit and durable state -------------------------------------------------------
CHANGED=0
sed "s#/opt/hallkiosk/bin/hallkiosk#$PREFIX/bin/hallkiosk#" "$SRC/deploy/systemd/hallkiosk.service" \
    | write_file 0644 /etc/systemd/system/hallkiosk.service
if [ "$AB" = 1 ]; then
    sed "s#/opt/hallkiosk#$PREFIX#g" "$SRC/deploy/systemd/hallkiosk-ab-slots.conf" \
        | write_file 0644 /etc/systemd/system/hallkiosk.service.d/ab-slots.conf
fi
if [ -n "$STATE_PARTITION" ]; then
    # A bind mount, not a symlink: StateDirectory= wants a real directory at the path, and
    # RequiresMountsFor= makes the agent wait for the partition instead of writing to RAM.
    write_file 0644 /etc/systemd/system/var-lib-hallkiosk.mount <<EOF
# Written by hallkiosk's deploy/install.sh: durable state on the writable partition.
[Unit]
Description=hallkiosk durable state on $STATE_PARTITION
RequiresMountsFor=$STATE_PARTITION

[Mount]
What=$STATE_PARTITION/hallkiosk
Where=/var/lib/hallkiosk
Type=none
Options=bind

[Install]
WantedBy=local-fs.target
EOF
    write_file 0644 /etc/systemd/system/hallkiosk.service.d/state-partition.conf <<EOF
# Written by hallkiosk's deploy/install.sh.
[Unit]
RequiresMountsFor=/var/lib/hallkiosk
EOF
    if [ "$WRITE" = 1 ]; then install -d -m 0700 "$ROOT$STATE_PARTITION/hallkiosk"; fi
    run chown "$USER_NAME:$USER_NAME" "$STATE_PARTITION/hallkiosk"
    run install -d -m 0700 /var/lib/hallkiosk
elif [ "$EXEC" = 1 ] && [ "$(findmnt -n -o FSTYPE / 2>/dev/null)" = overlay ]; then
    say "WARNING: / is an overlay and no --state-partition was given: the outbox would live in RAM"
fi
UNIT_CHANGED=$CHANGED

# -- 5. udev rules -----------------------------------------------------------------------------
CHANGED=0
install_file 0644 "$SRC/deploy/udev/99-hallkiosk.rules" /etc/udev/rules.d/99-hallkiosk.rules
if [ "$CHANGED" = 1 ]; then
    run udevadm control --reload
    run udevadm trigger --subsystem-match=tty --action=add
fi

# -- 6. hardware watchdog ----------------------------------------------------------------------
CHANGED=0
write_file 0644 /etc/systemd/system.conf.d/50-hallkiosk-watchdog.conf <<EOF
# Written by hallkiosk's deploy/install.sh. systemd itself feeds the hardware watchdog:
# if the kernel or systemd hangs, the board resets after RuntimeWatchdogSec.
# RebootWatchdogSec bounds a reboot that hangs.
[Manager]
RuntimeWatchdogSec=$WATCHDOG_SEC
RebootWatchdogSec=2min
EOF
WATCHDOG_CHANGED=$CHANGED
for cfg in /boot/firmware/config.txt /boot/config.txt; do
    if [ -f "$ROOT$cfg" ]; then
        if grep -Eq '^[[:space:]]*dtparam=watchdog=on' "$ROOT$cfg"; then
            say "watchdog already enabled in $cfg"
        elif [ "$WRITE" = 1 ]; then
            printf '\n# hallkiosk: hardware watchdog (bcm2835-wdt)\ndtparam=watchdog=on\n' >>"$ROOT$cfg"
            say "enabled the watchdog in $cfg (takes effect at the next boot)"
        else
            say "would enable the watchdog in $cfg"
        fi
        break
    fi
done
if [ "$WATCHDOG_CHANGED" = 1 ]; then
    # daemon-reload does not re-read system.conf; daemon-reexec does.
    run systemctl daemon-reexec
fi

# -- 7. enable and start -----------------------------------------------------------------------
run systemctl daemon-reload
if [ -n "$STATE_PARTITION" ]; then
    run systemctl enable var-lib-hallkiosk.mount
fi
run systemctl enable hallkiosk.service
if [ -f "$ROOT/etc/hallkiosk/agent.toml" ]; then
    run "$VENV/bin/hallkiosk" check-config --config /etc/hallkiosk/agent.toml
    if [ "$START" = 1 ]; then
        if [ -n "$STATE_PARTITION" ]; then run systemctl start var-lib-hallkiosk.mount; fi
        run systemctl restart hallkiosk.service
    fi
else
    say "next: write /etc/hallkiosk/agent.toml (see agent.toml.example), the hall secret and"
    say "      the device key (chmod 600, owner $USER_NAME), then: systemctl start hallkiosk"
fi
if [ "$UNIT_CHANGED" = 1 ]; then say "unit files changed"; fi
say "done"
