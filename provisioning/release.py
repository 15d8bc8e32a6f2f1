"""The hall's update repository: The Update Framework (TUF) metadata signed with python-tuf.

Why TUF and not a signature over each bundle: a kiosk that only checks "signed by the
release key" can be fed an old, vulnerable release that was validly signed (rollback), be
kept on stale metadata forever (freeze), or be lost for good when that one key leaks. TUF's
four roles split those duties and python-tuf (``tuf.api.metadata`` here, ``tuf.ngclient``
on the kiosk) implements the specification's checks, so none is hand-made:

- ``root`` lists the keys and thresholds of every role; it is signed offline and rotated
  by publishing ``N+1.root.json`` signed by a threshold of the old AND the new root keys;
- ``targets`` lists the release bundles (length + sha256) a kiosk may install;
- ``snapshot`` pins the version of ``targets`` (no mix-and-match of old and new files);
- ``timestamp`` pins the snapshot and expires after a day: re-signed by a cron job
  (``hallkiosk provision release timestamp``), so a kiosk fed a frozen view notices.

Layout of a repository directory (served as is over HTTPS, ``serve``)::

    metadata/1.root.json, 2.root.json, ...   every root version (the client walks them)
    metadata/root.json                      the newest root (what a kiosk is provisioned with)
    metadata/timestamp.json
    metadata/N.snapshot.json, N.targets.json (consistent snapshots: a kiosk never reads a
                                              half-published set)
    targets/<sha256>.<name>                 the bundles, named by hash (same reason)

Keys are Ed25519 (securesystemslib's CryptoSigner over a ``cryptography`` key), kept as
PKCS#8 PEM files (0600) under ``keys_dir/<role>/<keyid>.pem``. ``keys_dir`` is meant to be
an offline medium for ``root`` and ``targets``; the timestamp and snapshot keys may live on
the station that runs the cron job. Thresholds above 1 need that many keys present when
signing.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import ssl
import threading
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (TOP_LEVEL_ROLE_NAMES, MetaFile, Metadata, Root, Snapshot,
                              TargetFile, Targets, Timestamp)
from tuf.api.serialization.json import JSONSerializer

from edge.clock import SYSTEM_CLOCK, Clock
from provisioning.ca import load_key_file, pem_key
from provisioning.enroll import write_private_file
from provisioning.errors import ProvisioningError

log = logging.getLogger("hallkiosk.release")

ROLES: Final = ("root", "targets", "snapshot", "timestamp")
#: How long each role's metadata stays valid (days). The timestamp's day is what bounds a
#: freeze attack; root's year is how long a kiosk may stay offline and still update
#: without re-provisioning.
DEFAULT_EXPIRY_DAYS: Final = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
_SERIALIZER: Final = JSONSerializer(compact=False)


class ReleaseError(ProvisioningError):
    """A repository operation that cannot be done (missing key, bad threshold, bad file)."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class Published:
    """What a publish step left in the repository: versions per role."""

    root: int
    targets: int
    snapshot: int
    timestamp: int


class ReleaseRepository:
    """One repository directory and its keys. Every change re-signs what it touches and
    then snapshot and timestamp, so the repository is always consistent on disk; files are
    written before the timestamp that points at them (a kiosk that reads mid-publish sees
    the previous complete set)."""

    def __init__(self, repo_dir: Path, keys_dir: Path, *, clock: Clock = SYSTEM_CLOCK,
                 expiry_days: dict[str, float] | None = None) -> None:
        self.dir = Path(repo_dir)
        self.meta_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys_dir = Path(keys_dir)
        self.clock = clock
        self.expiry_days = {**DEFAULT_EXPIRY_DAYS, **(expiry_days or {})}

    # -- keys ------------------------------------------------------------------------------
    def new_key(self, role: str) -> CryptoSigner:
        """Generate an Ed25519 key for ``role`` and keep it under keys_dir/role/."""
        key = Ed25519PrivateKey.generate()
        signer = CryptoSigner(key)
        write_private_file(self.keys_dir / role / f"{signer.public_key.keyid}.pem", pem_key(key))
        return signer

    def signers(self, role: str, keyids: list[str]) -> list[CryptoSigner]:
        """The signers present in keys_dir for these keyids (absent ones are skipped: a
        threshold may be met by the keys at hand)."""
        out = []
        for keyid in keyids:
            path = self.keys_dir / role / f"{keyid}.pem"
            if path.exists():
                out.append(CryptoSigner(load_key_file(path, f"{role} key")))
        return out

    # -- reading ---------------------------------------------------------------------------
    def _expires(self, role: str) -> dt.datetime:
        now = dt.datetime.fromtimestamp(self.clock.wall(), dt.timezone.utc).replace(microsecond=0)
        return now + dt.timedelta(days=self.expiry_days[role])

    def _published(self) -> bool:
        return (self.meta_dir / "timestamp.json").exists()

    def root(self) -> Metadata[Root]:
        return Metadata.from_file(str(self.meta_dir / "root.json"))

    def _load(self, role: str) -> Metadata[Any]:
        if role == "timestamp":
            return Metadata.from_file(str(self.meta_dir / "timestamp.json"))
        if role == "root":
            return self.root()
        ts: Metadata[Timestamp] = Metadata.from_file(str(self.meta_dir / "timestamp.json"))
        snap_v = ts.signed.snapshot_meta.version
        if role == "snapshot":
            return Metadata.from_file(str(self.meta_dir / f"{snap_v}.snapshot.json"))
        snap: Metadata[Snapshot] = Metadata.from_file(
            str(self.meta_dir / f"{snap_v}.snapshot.json"))
        return Metadata.from_file(
            str(self.meta_dir / f"{snap.signed.meta['targets.json'].version}.targets.json"))

    def versions(self) -> Published:
        return Published(*(self._load(r).signed.version for r in ROLES))

    def targets(self) -> dict[str, TargetFile]:
        return dict(self._load("targets").signed.targets)

    # -- signing ---------------------------------------------------------------------------
    def _sign(self, md: Metadata[Any], root: Root, role: str) -> None:
        r = root.roles[role]
        signers = self.signers(role, r.keyids)
        if len(signers) < r.threshold:
            raise ReleaseError(f"{role}: {len(signers)} of the {r.threshold} keys needed are "
                               f"in {self.keys_dir / role}")
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)

    def _write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(_SERIALIZER)
        _write_atomic(self.meta_dir / f"{md.signed.version}.root.json", data)
        _write_atomic(self.meta_dir / "root.json", data)

    def _publish(self, root: Root, targets: Metadata[Targets] | None) -> Published:
        """Write targets (if given), then a new snapshot, then a new timestamp."""
        if targets is not None:
            targets.signed.expires = self._expires("targets")
            self._sign(targets, root, "targets")
            _write_atomic(self.meta_dir / f"{targets.signed.version}.targets.json",
                          targets.to_bytes(_SERIALIZER))
            targets_v = targets.signed.version
        else:
            targets_v = self._load("targets").signed.version
        snap_v = self._load("snapshot").signed.version + 1 if self._published() else 1
        snapshot = Metadata(Snapshot(version=snap_v, expires=self._expires("snapshot"),
                                     meta={"targets.json": MetaFile(version=targets_v)}))
        self._sign(snapshot, root, "snapshot")
        _write_atomic(self.meta_dir / f"{snap_v}.snapshot.json", snapshot.to_bytes(_SERIALIZER))
        return self.publish_timestamp(root=root, snapshot_version=snap_v)

    def publish_timestamp(self, *, root: Root | None = None,
                          snapshot_version: int | None = None) -> Published:
        """A fresh timestamp over the current snapshot (the daily cron job)."""
        root = root or self.root().signed
        ts_v, snap_v = 1, 1
        if self._published():
            old = self._load("timestamp").signed
            ts_v, snap_v = old.version + 1, old.snapshot_meta.version
        ts = Metadata(Timestamp(version=ts_v, expires=self._expires("timestamp"),
                                snapshot_meta=MetaFile(version=snapshot_version or snap_v)))
        self._sign(ts, root, "timestamp")
        _write_atomic(self.meta_dir / "timestamp.json", ts.to_bytes(_SERIALIZER))
        return self.versions()

    # -- operations ------------------------------------------------------------------------
    def init(self, *, thresholds: dict[str, int] | None = None,
             keys_per_role: dict[str, int] | None = None) -> Published:
        """A new repository: keys for each role (as many as ``keys_per_role``), root v1,
        empty targets, snapshot and timestamp."""
        if (self.meta_dir / "root.json").exists():
            raise ReleaseError(f"{self.dir}: a repository is already there")
        thresholds = {r: 1 for r in ROLES} | (thresholds or {})
        counts = {r: thresholds[r] for r in ROLES} | (keys_per_role or {})
        for role in ROLES:
            if not 1 <= thresholds[role] <= counts[role]:
                raise ReleaseError(f"{role}: threshold {thresholds[role]} with "
                                   f"{counts[role]} keys")
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(version=1, expires=self._expires("root"), consistent_snapshot=True)
        for role in ROLES:
            for _ in range(counts[role]):
                root.add_key(self.new_key(role).public_key, role)
            root.roles[role].threshold = thresholds[role]
        md = Metadata(root)
        self._sign(md, root, "root")
        self._write_root(md)
        targets = Metadata(Targets(version=1, expires=self._expires("targets")))
        return self._publish(root, targets)

    def add_target(self, path: Path, name: str | None = None,
                   custom: dict[str, Any] | None = None) -> TargetFile:
        """Add (or replace) a release bundle: copied as targets/<sha256>.<name>, then
        targets, snapshot and timestamp re-signed. ``custom`` (e.g. ``{"version": "0.2.0"}``)
        is signed with it."""
        path = Path(path)
        name = name or path.name
        if "/" in name or name.startswith("."):
            raise ReleaseError(f"target name {name!r}: a plain file name is expected")
        with open(path, "rb") as f:
            info = TargetFile.from_data(name, f, ["sha256"])
        if custom:
            info.unrecognized_fields["custom"] = dict(custom)
        dest = self.targets_dir / f"{info.hashes['sha256']}.{name}"
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        root = self.root().signed
        targets = self._load("targets")
        targets.signed.version += 1
        targets.signed.targets[name] = info
        self._publish(root, targets)
        return info

    def rotate(self, role: str, *, revoke: list[str] | None = None, add: int = 1,
               threshold: int | None = None) -> list[str]:
        """Key rotation: a new root version where ``role`` gets ``add`` new keys, loses the
        keyids in ``revoke``, and takes ``threshold``. The new root is signed by the old
        root's threshold and the new one's (TUF section 5.3.4), then the role's own metadata
        is re-signed with its new keys. Returns the new keyids."""
        if role not in ROLES:
            raise ReleaseError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        old_md = self.root()
        old = old_md.signed
        new_md = Metadata.from_bytes(old_md.to_bytes())
        root = new_md.signed
        root.version += 1
        root.expires = self._expires("root")
        added = []
        for _ in range(add):
            signer = self.new_key(role)
            root.add_key(signer.public_key, role)
            added.append(signer.public_key.keyid)
        for keyid in revoke or []:
            root.revoke_key(keyid, role)
        if threshold is not None:
            root.roles[role].threshold = threshold
        r = root.roles[role]
        if not 1 <= r.threshold <= len(r.keyids):
            raise ReleaseError(f"{role}: threshold {r.threshold} with {len(r.keyids)} keys")
        old_signers = self.signers("root", old.roles["root"].keyids)
        if len(old_signers) < old.roles["root"].threshold:
            raise ReleaseError("root rotation: the old root's threshold of keys is not at hand")
        new_signers = self.signers("root", root.roles["root"].keyids)
        if len(new_signers) < root.roles["root"].threshold:
            raise ReleaseError("root rotation: the new root's threshold of keys is not at hand")
        new_md.signatures.clear()
        for s in {s.public_key.keyid: s for s in old_signers + new_signers}.values():
            new_md.sign(s, append=True)
        self._write_root(new_md)
        targets = None
        if role == "targets":
            targets = self._load("targets")
            targets.signed.version += 1
        self._publish(root, targets)
        return added

    def set_threshold(self, role: str, threshold: int) -> None:
        self.rotate(role, add=0, threshold=threshold)


# -- the HTTPS server on the hall network ----------------------------------------------------
class RepositoryHandler(SimpleHTTPRequestHandler):
    """Static files of the repository directory, with single byte ranges (``Range:
    bytes=N-`` or ``N-M``) so a kiosk resumes a cut download where it stopped.
    http.server has no Range support of its own."""

    server_version = "hallkiosk-updates/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        log.debug("%s %s", self.address_string(), format % args)

    def send_head(self):  # type: ignore[override]
        self._range: tuple[int, int] | None = None
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        size = path.stat().st_size
        spec = self.headers.get("Range")
        f = open(path, "rb")
        if spec:
            try:
                unit, _, rng = spec.partition("=")
                first_s, _, last_s = rng.strip().partition("-")
                if unit.strip() != "bytes" or "," in rng or not first_s:
                    raise ValueError(spec)
                first, last = int(first_s), int(last_s) if last_s else size - 1
                if first > last or first >= size:
                    raise IndexError(spec)
            except ValueError:
                spec = None       # an unsupported form: RFC 9110 says ignore it
            except IndexError:
                f.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
        if spec:
            last = min(last, size - 1)
            self._range = (first, last)
            f.seek(first)
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Content-Length", str(last - first + 1))
        else:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Length", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        return f

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        remaining = None if self._range is None else self._range[1] - self._range[0] + 1
        while remaining is None or remaining > 0:
            block = source.read(65536 if remaining is None else min(65536, remaining))
            if not block:
                break
            outputfile.write(block)
            if remaining is not None:
                remaining -= len(block)


class RepositoryServer:
    """The repository directory over HTTPS (server certificate from the hall CA, e.g.
    ``hallkiosk provision issue-broker --name updates --ip ...``). ``start()`` serves on a
    thread; ``port=0`` picks a free port (tests)."""

    def __init__(self, repo_dir: Path, cert_file: Path, key_file: Path, *,
                 host: str = "127.0.0.1", port: int = 8443,
                 handler: type[RepositoryHandler] = RepositoryHandler) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert_file), str(key_file))
        self.httpd = ThreadingHTTPServer((host, port), partial(handler, directory=str(repo_dir)))
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> RepositoryServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="tuf-repo",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RepositoryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["DEFAULT_EXPIRY_DAYS", "Published", "ROLES", "ReleaseError", "ReleaseRepository",
           "RepositoryHandler", "RepositoryServer", "TOP_LEVEL_ROLE_NAMES"]
