"""The per-boot provisioning bundle, on a small seed disk the guest reads at boot.

The image is built once and cached; what changes each run (the hall's CA, the kiosk's
certificate and key, the hall secret) travels on a second virtio disk (``/dev/vdb``, ext4,
read-only, made on the host with ``mke2fs -d`` in milliseconds). In the guest,
``hallkiosk-seed.service`` (qemu/guest/) copies ``bundle/*`` to ``/etc/hallkiosk`` before the
agent starts, with the modes deploy/install.sh expects: the install step of a real kiosk,
fed with what the enroll command wrote to its boot partition.

The bundle is the real one: ``provisioning.bundle.write_bundle`` for a kiosk the emulated
hall enrolled (device.crt, ca-chain.pem, crl.pem, services.pem, agent.toml), plus the two
secrets that never travel in a bundle on a real kiosk and here must (the device key was
"generated on the kiosk" by the emulated enrolment; the hall secret)::

    bundle/agent.toml  device.crt  ca-chain.pem  crl.pem  services.pem
    bundle/device.key  citizen.secret                           (0600 in the guest)
    hostname                                                    (the device id)

agent.toml has the guest's view of the wiring: the broker at QEMU's guestfwd address (the
broker certificate must name it: :func:`qemu.harness.admit_guest` re-issues it) and the
serial devices at the stable names qemu/guest/90-hallkiosk-qemu.rules gives the PCI UARTs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.keys import write_private_file
from hallkiosk.errors import HallkioskError

#: Where the guest reaches the host's broker: QEMU's guestfwd relays it to 127.0.0.1:<port>.
GUEST_BROKER_HOST = "10.0.2.100"
GUEST_BROKER_PORT = 8883
GUEST_ETC = "/etc/hallkiosk"


class SeedError(HallkioskError, RuntimeError):
    """The seed disk could not be written."""


@dataclass(frozen=True)
class GuestWiring:
    """The agent.toml sections the enroll command leaves to the site: devices, GPIO, clock.

    Times in seconds. Under full-system emulation the guest runs several times slower than a
    Pi 4, so the serial timeouts are wider than the emulator's (a reply is late, not lost).
    """

    reader_port: str = "/dev/hallkiosk/idcard"
    printer_port: str = "/dev/hallkiosk/printer"
    reader_poll_s: float = 0.3
    reader_timeout_s: float = 2.0
    printer_timeout_s: float = 3.0


def _s(value: str) -> str:
    return json.dumps(value)    # a JSON string is a valid TOML basic string


def site_toml(w: GuestWiring) -> str:
    return "\n".join([
        "[devices.reader]",
        f"port = {_s(w.reader_port)}",
        f"poll_interval_s = {w.reader_poll_s}",
        f"timeout_s = {w.reader_timeout_s}",
        "",
        "[devices.printer]",
        f"port = {_s(w.printer_port)}",
        f"timeout_s = {w.printer_timeout_s}",
        "",
        "[gpio]",
        "# The virt board has no GPIO header: buttons and LEDs are gpiozero mocks in the agent.",
        'pin_factory = "mock"',
        "",
        "[clock]",
        "# The VM's clock is the host's (PL031 RTC, read at boot); there is no NTP to wait for.",
        'trust = "assume_synced"',
    ]) + "\n"


def write_guest_bundle(dest: Path, pki, identity, *, hall_name: str, prefix: str,
                       services: Sequence[tuple[str, str, str]], secret: bytes,
                       wiring: GuestWiring = GuestWiring(), board: str = "rpi4b",
                       etc_dir: str = GUEST_ETC, extra_toml: str = "") -> Path:
    """The seed tree under ``dest`` (made fresh) for an enrolled kiosk ``identity`` of the
    hall whose provisioning materials are ``pki`` (provisioning.emulated.HallMaterials).

    ``etc_dir`` is where the guest installs the bundle (tests point it at a temp dir);
    ``extra_toml`` is appended to agent.toml (more site sections, e.g. the privacy cell).
    """
    from cryptography import x509

    from provisioning.bundle import KioskSettings, write_bundle

    shutil.rmtree(dest, ignore_errors=True)
    bundle = dest / "bundle"
    bundle.mkdir(parents=True)
    settings = KioskSettings(
        device_id=identity.id, hall=pki.hall, hall_name=hall_name, number_prefix=prefix,
        board=board, broker_host=GUEST_BROKER_HOST, broker_port=GUEST_BROKER_PORT,
        services=tuple(services), key_path=f"{etc_dir}/device.key",
        secret_path=f"{etc_dir}/citizen.secret",
        extra_toml=site_toml(wiring) + ("\n" + extra_toml if extra_toml else ""))
    cert = x509.load_pem_x509_certificate(identity.cert_path.read_bytes())
    write_bundle(bundle, pki.ca, cert, settings, pki.certs(("consumer", "ops", "booking")),
                 clock=pki.clock)
    write_private_file(bundle / "device.key", identity.key_path.read_bytes())
    write_private_file(bundle / "citizen.secret", secret)
    (dest / "hostname").write_text(identity.id + "\n")
    return dest


def make_seed_disk(tree: Path, image: Path, size_mb: int = 8) -> Path:
    """Pack ``tree`` into a small ext4 image (no mount, no root needed)."""
    image.unlink(missing_ok=True)
    try:
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "hkseed", "-d", str(tree),
                        str(image), f"{size_mb}M"], check=True, capture_output=True)
    except FileNotFoundError:
        raise SeedError("mke2fs not found: install e2fsprogs") from None
    except subprocess.CalledProcessError as exc:
        raise SeedError(f"mke2fs failed for {image}: {exc.stderr.decode(errors='replace')}") from None
    return image
