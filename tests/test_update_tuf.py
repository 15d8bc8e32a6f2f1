"""The update repository and the kiosk's view of it: real python-tuf metadata, real
Ed25519 keys, real HTTPS on loopback with a certificate from the hall CA.

Every attack the issue names is refused with its own code: a tampered bundle, expired
metadata, a replayed (older) timestamp, a key the root does not list, a frozen (stale)
timestamp; a cut download resumes with a Range request."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Metadata

from edge.clock import ManualClock
from edge.update.errors import UpdateRefused
from edge.update.fetch import ReleaseSource
from provisioning.ca import create_hall_ca, load_hall_ca, pem_key
from provisioning.enroll import issue_broker
from provisioning.release import (ReleaseError, ReleaseRepository, RepositoryHandler,
                                  RepositoryServer)

BUNDLE = bytes(range(256)) * 2048            # 512 KiB: several chunks


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    create_hall_ca(d / "ca", "h1")
    ca = load_hall_ca(d / "ca")
    issue_broker(ca, d / "srv", name="updates", ip_addresses=("127.0.0.1",))
    return d / "srv" / "broker.crt", d / "srv" / "broker.key", d / "srv" / "chain.pem"


class Rig:
    def __init__(self, tmp: Path, tls, handler=RepositoryHandler) -> None:
        cert, key, self.chain = tls
        self.tmp = tmp
        self.repo = ReleaseRepository(tmp / "repo", tmp / "keys")
        self.repo.init()
        (tmp / "hallkiosk-0.2.0.tar").write_bytes(BUNDLE)
        self.info = self.repo.add_target(tmp / "hallkiosk-0.2.0.tar", custom={"version": "0.2.0"})
        # What provisioning puts on the kiosk: the root of the day it was enrolled.
        shutil.copy(tmp / "repo" / "metadata" / "1.root.json", tmp / "provisioned-root.json")
        self.server = RepositoryServer(tmp / "repo", cert, key, port=0, handler=handler).start()
        self.kiosk_root = tmp / "kiosk"

    def source(self) -> ReleaseSource:
        return ReleaseSource(self.kiosk_root, self.server.url, self.chain,
                             self.tmp / "provisioned-root.json", timeout_s=5)

    def refused(self, name: str = "hallkiosk-0.2.0.tar") -> UpdateRefused:
        with pytest.raises(UpdateRefused) as exc:
            self.source().fetch(name)
        return exc.value

    def close(self) -> None:
        self.server.stop()


@pytest.fixture
def rig(tmp_path, tls):
    r = Rig(tmp_path, tls)
    yield r
    r.close()


def test_signed_release_is_fetched_and_verified(rig):
    rel = rig.source().fetch("hallkiosk-0.2.0.tar")
    assert rel.version == "0.2.0" and rel.length == len(BUNDLE)
    assert rel.path.read_bytes() == BUNDLE
    assert rel.path.name == f"{rel.sha256}.bundle"


def test_tampered_target_is_refused_and_not_kept(rig):
    served = rig.tmp / "repo" / "targets" / f"{rig.info.hashes['sha256']}.hallkiosk-0.2.0.tar"
    data = bytearray(served.read_bytes())
    data[1000] ^= 0xFF                        # same length, one byte changed
    served.write_bytes(bytes(data))
    err = rig.refused()
    assert err.code == "tampered"
    assert not list((rig.kiosk_root / "downloads").glob("*.bundle"))
    assert not list((rig.kiosk_root / "downloads").glob("*.part"))


def test_unknown_target_is_refused(rig):
    assert rig.refused("hallkiosk-9.9.9.tar").code == "unknown_target"


def test_expired_targets_metadata_is_refused(rig):
    rig.repo.expiry_days["targets"] = -1        # signed correctly, but already expired
    (rig.tmp / "other.tar").write_bytes(b"x" * 100)
    rig.repo.add_target(rig.tmp / "other.tar")
    err = rig.refused()
    assert err.code == "expired" and "targets" in err.detail


def test_replayed_older_timestamp_is_refused_as_rollback(rig):
    ts = rig.tmp / "repo" / "metadata" / "timestamp.json"
    old = ts.read_bytes()
    rig.repo.publish_timestamp()
    rig.source().lookup("hallkiosk-0.2.0.tar")          # the kiosk now trusts the newer one
    ts.write_bytes(old)                                  # an attacker replays the old one
    err = rig.refused()
    assert err.code == "rollback", err


def test_metadata_signed_with_a_key_the_root_does_not_list_is_refused(rig):
    # The timestamp key file is swapped for another key: the signature is valid Ed25519,
    # but by a key the trusted root never listed.
    (path,) = (rig.tmp / "keys" / "timestamp").glob("*.pem")
    path.write_bytes(pem_key(Ed25519PrivateKey.generate()))
    rig.repo.publish_timestamp()
    err = rig.refused()
    assert err.code == "bad_signature", err


def test_frozen_stale_timestamp_is_refused_as_freeze(rig):
    rig.source().lookup("hallkiosk-0.2.0.tar")
    # A mirror that froze the kiosk's view: the newest timestamp it serves was signed two
    # days ago and has expired (the timestamp role expires after one day).
    rig.repo.clock = ManualClock(start_wall=time.time() - 2 * 86400)
    rig.repo.publish_timestamp()
    err = rig.refused()
    assert err.code == "freeze" and "timestamp" in err.detail


def test_root_and_timestamp_key_rotation_is_followed(rig):
    rig.source().lookup("hallkiosk-0.2.0.tar")
    ts_keys = rig.repo.root().signed.roles["timestamp"].keyids
    rig.repo.rotate("root")                                    # root v2: one more root key
    new = rig.repo.rotate("timestamp", revoke=ts_keys)         # root v3: old ts key revoked
    assert rig.repo.versions().root == 3
    rel = rig.source().fetch("hallkiosk-0.2.0.tar")            # walks 2.root, 3.root
    assert rel.version == "0.2.0"
    cached = json.loads((rig.kiosk_root / "tuf" / "root.json").read_bytes())
    assert cached["signed"]["version"] == 3
    assert cached["signed"]["roles"]["timestamp"]["keyids"] == new
    # The revoked key can no longer sign a timestamp the kiosk accepts.
    (old_key,) = [p for p in (rig.tmp / "keys" / "timestamp").glob("*.pem")
                  if p.stem in ts_keys]
    for p in (rig.tmp / "keys" / "timestamp").glob("*.pem"):
        if p != old_key:
            p.write_bytes(old_key.read_bytes())          # only the old key left to sign with
    rig.repo.publish_timestamp()
    assert rig.refused().code == "bad_signature"


def test_a_root_emptied_by_a_power_cut_falls_back_to_the_provisioned_one(rig):
    # What the QEMU power-cut campaign found: ngclient renames its metadata into place
    # without fsync, so after a cut the cached root can be an empty file on ext4.
    rig.source().lookup("hallkiosk-0.2.0.tar")
    (rig.kiosk_root / "tuf" / "root_history" / "1.root.json").write_bytes(b"")
    rel = rig.source().fetch("hallkiosk-0.2.0.tar")
    assert rel.version == "0.2.0"
    cached = json.loads((rig.kiosk_root / "tuf" / "root.json").read_bytes())
    assert cached["signed"]["version"] == 1


def test_a_damaged_newest_root_falls_back_to_the_older_one_and_walks_forward(rig):
    rig.source().lookup("hallkiosk-0.2.0.tar")
    ts_keys = rig.repo.root().signed.roles["timestamp"].keyids
    rig.repo.rotate("root")
    rig.repo.rotate("timestamp", revoke=ts_keys)               # root v3
    rig.source().lookup("hallkiosk-0.2.0.tar")
    history = rig.kiosk_root / "tuf" / "root_history"
    assert sorted(p.name for p in history.iterdir()) == [
        "1.root.json", "2.root.json", "3.root.json"]
    (history / "3.root.json").write_bytes(b'{"signed": ')     # half written
    # The provisioned root must not be what it starts from: make it unusable too.
    (rig.tmp / "provisioned-root.json").write_bytes(b"")
    rig.source().lookup("hallkiosk-0.2.0.tar")                 # from 2.root, walks to 3
    cached = json.loads((rig.kiosk_root / "tuf" / "root.json").read_bytes())
    assert cached["signed"]["version"] == 3
    assert cached["signed"]["roles"]["timestamp"]["keyids"] != ts_keys


def test_every_trusted_root_unreadable_is_refused_not_crashed(rig):
    rig.source().lookup("hallkiosk-0.2.0.tar")
    (rig.kiosk_root / "tuf" / "root_history" / "1.root.json").write_bytes(b"")
    (rig.tmp / "provisioned-root.json").write_bytes(b"not json")
    err = rig.refused()
    assert err.code == "repository" and "Deserialization" in err.detail


def test_threshold_of_two_targets_keys(rig):
    rig.repo.rotate("targets", add=1, threshold=2)
    (rig.tmp / "b.tar").write_bytes(b"b" * 10)
    rig.repo.add_target(rig.tmp / "b.tar")
    assert rig.source().fetch("b.tar").length == 10
    # A targets file carrying one of the two signatures needed is refused.
    v = rig.repo.versions().targets
    path = rig.tmp / "repo" / "metadata" / f"{v}.targets.json"
    md = Metadata.from_file(str(path))
    md.signatures.popitem()
    path.write_bytes(md.to_bytes())
    shutil.rmtree(rig.kiosk_root / "tuf")          # a kiosk that has not cached this version
    assert rig.refused("b.tar").code == "bad_signature"
    # And the station refuses to sign with fewer keys than the threshold.
    next(iter((rig.tmp / "keys" / "targets").glob("*.pem"))).unlink()
    with pytest.raises(ReleaseError, match="1 of the 2 keys"):
        rig.repo.add_target(rig.tmp / "b.tar", name="c.tar")


class CuttingHandler(RepositoryHandler):
    """Cuts the first download of a target after CUT bytes (a Wi-Fi drop); records the
    Range headers it was sent."""

    CUT = 200_000
    ranges: list[str | None] = []
    cut_done = threading.Event()

    def copyfile(self, source, outputfile) -> None:
        if "/targets/" not in self.path:
            return super().copyfile(source, outputfile)
        type(self).ranges.append(self.headers.get("Range"))
        if not self.cut_done.is_set():
            self.cut_done.set()
            outputfile.write(source.read(self.CUT))
            outputfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        return super().copyfile(source, outputfile)


def test_cut_download_resumes_with_range(tmp_path, tls):
    CuttingHandler.ranges = []
    CuttingHandler.cut_done = threading.Event()
    rig = Rig(tmp_path, tls, handler=CuttingHandler)
    try:
        err = rig.refused()
        assert err.code == "unreachable" and "cut at" in err.detail
        part = next((rig.kiosk_root / "downloads").glob("*.part"))
        # Kept, fsync'd chunk by chunk (the chunk the cut broke is not written).
        have = part.stat().st_size
        assert 0 < have <= CuttingHandler.CUT
        rel = rig.source().fetch("hallkiosk-0.2.0.tar")
        assert rel.path.read_bytes() == BUNDLE
        assert CuttingHandler.ranges == [None, f"bytes={have}-"]
    finally:
        rig.close()


def test_a_part_longer_than_signed_is_discarded(rig):
    dl = rig.kiosk_root / "downloads"
    dl.mkdir(parents=True)
    (dl / f"{rig.info.hashes['sha256']}.part").write_bytes(b"z" * (len(BUNDLE) + 5))
    assert rig.source().fetch("hallkiosk-0.2.0.tar").path.read_bytes() == BUNDLE


def test_https_only_with_the_hall_ca(rig, tmp_path):
    other = tmp_path / "other-ca"
    create_hall_ca(other, "h2")
    src = ReleaseSource(rig.kiosk_root, rig.server.url, other / "chain.pem",
                        rig.tmp / "provisioned-root.json", timeout_s=5)
    with pytest.raises(UpdateRefused) as exc:
        src.fetch("hallkiosk-0.2.0.tar")
    assert exc.value.code == "unreachable" and "certificate" in exc.value.detail.lower()
