"""The kiosk's mTLS material, checked before the agent connects.

``check_tls(ca_file, cert_file, key_file, crl_file=..., device_id=...)`` refuses to start
(ConfigError naming the file and the fix) when:
- the key file is readable by group or others (chmod 600), or is not Ed25519;
- the certificate is not the key's, not this device's (CN), not a kiosk's, not signed by
  the hall's chain, expired or not yet valid, or revoked by the CRL it was given.
It returns the TlsSettings for edge.mqtt.MqttLink and the days left on the certificate,
which the agent reports (and logs a warning below ``warn_days``: renew before expiry).

The agent runs these checks, and the reading of the hall services' certificates into its
keyring, in a short-lived helper process (``TlsCheck``, ``python -m edge.tls``). The agent
imports ``cryptography`` anyway (Ed25519), but X.509 parsing and chain, CRL and role checks
load more (``cryptography.x509``, ``provisioning``, the library pages they touch) and it needs
them only once, at start: done in the agent, they left it 3.3 MiB more resident (1.7 anonymous,
1.6 file-backed), measured after the agent's own imports under ``-OO``, with the garbage
collected and the heap trimmed, on an emulated hall's certificates. The helper gets the paths
and the agent's wall time, and answers in JSON: the checked settings, the trusted keys (raw,
owner, role) and the warnings it logged, which the agent logs as its own.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.clock import SYSTEM_CLOCK, Clock, ManualClock
from edge.keys import load_private_key, public_raw
from edge.mqtt import TlsSettings
from hallkiosk.errors import ConfigError

log = logging.getLogger("hallkiosk.tls")

#: Below this many days left the agent logs a renewal warning at every start.
DEFAULT_WARN_DAYS = 30


@dataclass(frozen=True, slots=True)
class CheckedTls:
    settings: TlsSettings
    owner: str
    days_left: float


def check_tls(ca_file: Path, cert_file: Path, key_file: Path, *, crl_file: Path | None = None,
              device_id: str | None = None, role: str = "kiosk",
              warn_days: float = DEFAULT_WARN_DAYS, clock: Clock = SYSTEM_CLOCK) -> CheckedTls:
    """Check the files as the broker will, before connecting; ConfigError says what to fix."""
    # Imported here: provisioning pulls in x509 parsing the agent needs only at start.
    from provisioning.ca import utc_now
    from provisioning.crl import load_crl
    from provisioning.errors import ProvisioningError
    from provisioning.trust import TrustAnchors, load_pem_certs

    key = load_private_key(Path(key_file))   # refuses 0644 keys and non-Ed25519 keys
    try:
        anchors = TrustAnchors(load_pem_certs(Path(ca_file)))
        certs = load_pem_certs(Path(cert_file))
        crl = load_crl(Path(crl_file)) if crl_file is not None else None
        now = utc_now(clock)
        info = anchors.check(certs[0], now=now, crl=crl, roles=(role,))
    except ProvisioningError as exc:
        raise ConfigError(f"{cert_file}: {exc}") from None
    if public_raw(key) != public_raw(info.public_key):
        raise ConfigError(f"{cert_file}: certificate is not for the key in {key_file} "
                          "(re-enroll: hallkiosk provision keygen, then enroll)")
    if device_id is not None and info.owner != device_id:
        raise ConfigError(f"{cert_file}: certificate is for {info.owner!r}, this kiosk is "
                          f"{device_id!r}")
    days_left = (info.not_after - now).total_seconds() / 86400
    if days_left < warn_days:
        log.warning("device certificate expires in %.1f days: renew it (hallkiosk provision "
                    "renew %s)", days_left, info.owner)
    return CheckedTls(TlsSettings(str(ca_file), str(cert_file), str(key_file)), info.owner,
                      days_left)


# -- the same checks in a helper process ---------------------------------------------------
#: Longest the helper may take (it reads a few small files; this is for a wedged machine).
HELPER_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class TrustedKey:
    raw: bytes
    owner: str
    roles: tuple[str, ...]


class TlsCheck:
    """check_tls and keyring_from_certs in a child process, started early, read when needed.

    ``start()`` spawns it (the agent does that first thing, so it overlaps the rest of the
    start); ``result()`` waits and returns (CheckedTls, [TrustedKey]) or raises the helper's
    ConfigError with its message unchanged.
    """

    def __init__(self, *, ca_file: Path, cert_file: Path, key_file: Path,
                 crl_file: Path | None, device_id: str | None, warn_days: float,
                 trusted_certs: Path | None, trusted_roles: tuple[str, ...],
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.request = {
            "ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(key_file),
            "crl_file": None if crl_file is None else str(crl_file), "device_id": device_id,
            "warn_days": warn_days, "wall": clock.wall(),
            "trusted_certs": None if trusted_certs is None else str(trusted_certs),
            "trusted_roles": list(trusted_roles)}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TlsCheck:
        self._proc = subprocess.Popen([sys.executable, "-m", "edge.tls"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        # The request is far below a pipe's buffer: this write cannot block.
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(self.request).encode())
        self._proc.stdin.close()
        self._proc.stdin = None           # communicate() must not touch it again
        return self

    def result(self) -> tuple[CheckedTls, list[TrustedKey]]:
        if self._proc is None:
            self.start()
        assert self._proc is not None
        try:
            out, err = self._proc.communicate(timeout=HELPER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            raise ConfigError(f"{self.request['cert_file']}: certificate check did not finish "
                              f"in {HELPER_TIMEOUT_S:.0f} s") from None
        try:
            answer = json.loads(out)
        except ValueError:
            detail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise ConfigError(f"{self.request['cert_file']}: certificate check failed "
                              f"(exit {self._proc.returncode}): {detail[0]}") from None
        for name, level, message in answer.get("logs", []):
            logging.getLogger(name).log(level, "%s", message)
        if "error" in answer:
            raise ConfigError(answer["error"])
        checked = CheckedTls(TlsSettings(*answer["settings"]), answer["owner"],
                             answer["days_left"])
        keys = [TrustedKey(base64.b64decode(k), owner, tuple(roles))
                for k, owner, roles in answer["trusted"]]
        return checked, keys


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _helper(request: dict[str, Any]) -> dict[str, Any]:
    from provisioning.trust import keyring_from_certs

    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    clock = ManualClock(start_wall=request["wall"])
    answer: dict[str, Any] = {}
    try:
        checked = check_tls(Path(request["ca_file"]), Path(request["cert_file"]),
                            Path(request["key_file"]),
                            crl_file=None if request["crl_file"] is None else Path(request["crl_file"]),
                            device_id=request["device_id"], warn_days=request["warn_days"],
                            clock=clock)
        trusted = []
        if request["trusted_certs"] is not None:
            ring = keyring_from_certs(Path(request["ca_file"]), [Path(request["trusted_certs"])],
                                      None if request["crl_file"] is None
                                      else Path(request["crl_file"]),
                                      clock=clock, roles=tuple(request["trusted_roles"]))
            for kid in ring:
                e = ring.get(kid)
                trusted.append((base64.b64encode(public_raw(e.public_key)).decode(), e.owner,
                                sorted(e.roles)))
        s = checked.settings
        answer = {"settings": [s.ca_file, s.cert_file, s.key_file], "owner": checked.owner,
                  "days_left": checked.days_left, "trusted": trusted}
    except ConfigError as exc:
        answer = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001  (provisioning's own errors name the file)
        answer = {"error": f"{request['cert_file']}: {exc}"}
    answer["logs"] = collect.records
    return answer


if __name__ == "__main__":
    print(json.dumps(_helper(json.load(sys.stdin))))
