"""Fetch and verify a release bundle: TUF metadata through python-tuf's ngclient, the
bundle itself by a resumable ranged download checked against the TUF target info.

Metadata: ``tuf.ngclient.Updater`` does the specification's client workflow (root
rotation, thresholds, expiry, rollback of versions, snapshot/timestamp consistency) over
our fetcher, which is urllib3 with the hall CA as the only trust anchor for HTTPS (the
metadata's own signatures are the real protection; TLS keeps the hall network out of the
kiosk's download path). The trusted root starts as the ``root.json`` provisioned with the
kiosk (``bootstrap``) and is then kept in the metadata cache.

Bundle: ngclient's ``download_target`` restarts from zero after a cut, and a bundle over a
busy hall Wi-Fi may be tens of MB. So the kiosk downloads it itself into
``downloads/<sha256>.part`` with ``Range: bytes=<have>-`` (fsync'd as it goes), and only
the complete file is checked with ``TargetFile.verify_length_and_hashes`` — the same check
``download_target`` makes — before it is renamed to ``<sha256>.bundle``. A part longer than
the signed length is thrown away; a server that ignores Range (200) restarts the file.

Every refusal is an ``UpdateRefused`` with a ``code`` ops can act on: ``expired``,
``freeze`` (the timestamp is stale: someone keeps a frozen view in front of the kiosk),
``rollback`` (a version older than one already trusted), ``bad_signature`` (a key or a
threshold the trusted root does not accept), ``tampered`` (bundle length or hash),
``unknown_target``, ``unreachable`` (network), ``repository`` (anything else).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from edge.update.errors import UpdateRefused
from edge.update.slots import crash_point

log = logging.getLogger("hallkiosk.update")

CHUNK = 64 * 1024


class HallFetcher(FetcherInterface):
    """HTTPS with the hall CA (``ca_file``) and nothing else trusted; no proxies."""

    def __init__(self, ca_file: Path, timeout_s: float = 30.0) -> None:
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(ca_file),
                                        retries=False)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            r = self.pool.request("GET", url, preload_content=False, timeout=self.timeout)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        if r.status >= 400:
            r.release_conn()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {r.status}", r.status)
        return self._chunks(r)

    @staticmethod
    def _chunks(r: Any) -> Iterator[bytes]:
        try:
            yield from r.stream(CHUNK)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_errors.DownloadError(str(exc)) from exc
        finally:
            r.release_conn()

    def ranged(self, url: str, part: Path, length: int,
               on_chunk: Callable[[int], None] | None = None) -> None:
        """Append to ``part`` from its current size up to ``length`` bytes."""
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if have == length:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            r = self.pool.request("GET", url, headers=headers, preload_content=False,
                                  timeout=self.timeout)
        except urllib3.exceptions.HTTPError as exc:
            raise UpdateRefused("unreachable", f"{url}: {exc}") from exc
        try:
            if r.status == 200 and have:
                have = 0                  # the server ignored Range: start over
            elif r.status not in (200, 206):
                raise UpdateRefused("unreachable" if r.status >= 500 else "unknown_target",
                                    f"{url}: HTTP {r.status}")
            with open(part, "r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                try:
                    for block in r.stream(CHUNK):
                        if have + len(block) > length:
                            raise UpdateRefused("tampered", f"server sent more than the "
                                                            f"{length} signed bytes")
                        f.write(block)
                        have += len(block)
                        f.flush()
                        os.fsync(f.fileno())
                        if on_chunk is not None:
                            on_chunk(have)
                except urllib3.exceptions.HTTPError as exc:
                    raise UpdateRefused("unreachable", f"download cut at {have} of {length} "
                                                       f"bytes: {exc}") from exc
            if have < length:
                raise UpdateRefused("unreachable", f"download cut at {have} of {length} bytes")
        finally:
            r.release_conn()


@dataclass(frozen=True, slots=True)
class Release:
    """A target the signed metadata lists, and where its verified bundle is."""

    name: str
    version: str | None
    length: int
    sha256: str
    path: Path


def _refusal(exc: Exception) -> UpdateRefused:
    text = str(exc)[:200] or type(exc).__name__
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return UpdateRefused("freeze" if "timestamp" in text.lower() else "expired", text)
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return UpdateRefused("rollback", text)
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return UpdateRefused("bad_signature", text)
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return UpdateRefused("tampered", text)
    if isinstance(exc, (tuf_errors.DownloadError, OSError)):
        return UpdateRefused("unreachable", text)
    return UpdateRefused("repository", f"{type(exc).__name__}: {text}")


class ReleaseSource:
    """The hall's repository as seen by one kiosk (``root`` is the slots root: metadata
    cache in ``root/tuf``, bundles in ``root/downloads``)."""

    def __init__(self, root: Path, url: str, ca_file: Path, trusted_root: Path, *,
                 timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.meta_dir = Path(root) / "tuf"
        self.downloads = Path(root) / "downloads"
        self.trusted_root = Path(trusted_root)
        self.fetcher = HallFetcher(ca_file, timeout_s)

    def _roots(self) -> Iterator[tuple[str, bytes | None]]:
        """Trusted roots to start from, best first: the cache's own (None: ngclient reads
        ``root.json``, a link to the newest verified root), each older verified root, and
        the provisioned one. The provisioned root is the anchor only until the first
        refresh: a rotation must not be undone by re-reading it while the cache is sound.

        Why more than the first: ngclient (python-tuf 7.0.1, ``_persist_file``) writes
        metadata with a temporary file and a rename but no fsync, so a power cut soon after
        a refresh can leave ``root_history/N.root.json`` empty on ext4 (seen in the QEMU
        power-cut campaign: every later refresh refused with "DeserializationError"). An
        unreadable local file is not an attack from the network (whoever writes this disk
        owns the kiosk); starting from the newest older root that still loads, ngclient
        walks the repository's ``N+1.root.json`` chain, each signed by its predecessor.
        """
        if (self.meta_dir / "root.json").exists():
            yield "cache", None
        history = self.meta_dir / "root_history"
        versions = sorted((int(p.name.split(".")[0]) for p in history.glob("*.root.json")
                           if p.name.split(".")[0].isdigit()), reverse=True) \
            if history.is_dir() else []
        for v in versions:
            try:
                yield f"root_history/{v}.root.json", (history / f"{v}.root.json").read_bytes()
            except OSError:
                continue
        yield "provisioned", self.trusted_root.read_bytes()

    def _updater(self) -> Updater:
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        first: Exception | None = None
        for where, bootstrap in self._roots():
            try:
                up = Updater(str(self.meta_dir), f"{self.url}/metadata/", str(self.downloads),
                             f"{self.url}/targets/", fetcher=self.fetcher, bootstrap=bootstrap)
            except (tuf_errors.RepositoryError, OSError, ValueError) as exc:
                # OSError: root.json links to a file that is gone.
                first = first or exc
                log.warning("update: trusted root from %s unusable (%s); trying the next",
                            where, exc)
                continue
            if first is not None:
                log.warning("update: starting from the trusted root in %s", where)
            return up
        raise first if first is not None else RuntimeError("no trusted root")

    def lookup(self, name: str) -> TargetFile:
        """Refresh the metadata (every TUF check) and return the signed info of ``name``."""
        try:
            up = self._updater()
            up.refresh()
            info = up.get_targetinfo(name)
        except Exception as exc:  # python-tuf raises its own tree, urllib3's and OSError
            raise _refusal(exc) from exc
        finally:
            # What ngclient wrote reaches the disk now rather than when the kernel gets to
            # it (see _roots): the window in which a cut can empty a file stays short.
            os.sync()
        if info is None:
            raise UpdateRefused("unknown_target", f"{name} is not in the signed targets")
        return info

    def fetch(self, name: str, on_chunk: Callable[[int], None] | None = None) -> Release:
        """Lookup, resumable download, verify; returns the verified bundle."""
        info = self.lookup(name)
        sha = info.hashes.get("sha256")
        if not isinstance(sha, str):
            raise UpdateRefused("repository", f"{name}: no sha256 in its target info")
        custom = info.unrecognized_fields.get("custom") or {}
        version = custom.get("version") if isinstance(custom, dict) else None
        self.downloads.mkdir(parents=True, exist_ok=True)
        done = self.downloads / f"{sha}.bundle"
        if not done.exists():
            part = self.downloads / f"{sha}.part"
            # Consistent snapshots: targets are served as <hash>.<name>.
            self.fetcher.ranged(f"{self.url}/targets/{sha}.{name}", part, info.length,
                                on_chunk)
            crash_point("update.download_complete")
            try:
                with open(part, "rb") as f:
                    info.verify_length_and_hashes(f)
            except tuf_errors.LengthOrHashMismatchError as exc:
                part.unlink()
                raise UpdateRefused("tampered", f"{name}: {exc}") from exc
            os.replace(part, done)
        return Release(name, version if isinstance(version, str) else None, info.length,
                       sha, done)


__all__ = ["HallFetcher", "Release", "ReleaseSource", "UpdateRefused"]
