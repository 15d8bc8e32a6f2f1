#!/usr/bin/env bash
# Set up everything `make demo` and `make test` need on a fresh Debian machine:
# the Debian packages (installed with apt-get when run as root, printed otherwise) and
# .venv with the package and its pinned dependencies. Safe to run again: it only does
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRA=${1:-test}

# Debian packages: the broker the tests and demo start, the zbar library pyzbar loads, and
# GNU cpio (the test suite checks the QEMU harness's initramfs writer against it).
need=()
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
# The city tier's clustered broker (JetStream + MQTT gateway; docs/city.md).
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
if ! ldconfig -p 2>/dev/null | grep -q 'libzbar\.so\.0'; then need+=(libzbar0); fi
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=(python3-venv); fi
for extra_pkg in ${HALLKIOSK_APT_EXTRA:-}; do
  dpkg -s "$extra_pkg" >/dev/null 2>&1 || need+=("$extra_pkg")
done

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Debian packages: ${need[*]}"
    # Update the package lists first, once: on a fresh machine they may be empty.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "bootstrap: missing Debian packages. Run as root:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${need[*]}" >&2
    exit 1
  fi
fi

# The Debian mosquitto and nats-server packages start system brokers; we never use them (tests and the demo
# start their own on a free loopback port), and we leave it alone.

stamp="$VENV/.hallkiosk-installed"
sum=$(sha256sum pyproject.toml | cut -c1-16)-$EXTRA-compat
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  echo "bootstrap: installing hallkiosk[$EXTRA] into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  # "compat" editable mode: a plain path entry in a .pth file. The default mode installs an
  # import finder that every Python start in the venv runs, and which imports pathlib,
  # urllib.parse and ipaddress (0.4 MB) before any of our code: the agent measured by
  # `make bench` would carry what the agent installed on a kiosk does not.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --config-settings editable_mode=compat -e ".[$EXTRA]"
  # MicroPython RP2 stubs for type-checking the cell node firmware: installed beside the
  # venv's site-packages, not into it (they ship top-level modules such as `requests` that
  # would shadow real packages).
  if [ "$EXTRA" = test ]; then
    rm -rf "$VENV/micropython-stubs"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
      --target "$VENV/micropython-stubs" micropython-rp2-stubs==1.29.0.post1 \
      micropython-stdlib-stubs==1.29.0.post2
  fi
  echo "$sum" > "$stamp"
fi
