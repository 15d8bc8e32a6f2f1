"""Release bundles and their installation into a slot.

A bundle is a tar file::

    bundle.json      {"format": 1, "version": "0.2.0", "requirement": "hallkiosk==0.2.0"}
    wheels/*.whl     the hallkiosk wheel and every pinned dependency's wheel for the board

Installing builds a fresh venv in the (inactive) slot and runs pip offline
(``--no-index --find-links wheels``), so a kiosk installs exactly the wheels the signed
bundle carries and nothing from the network. The slot's marker is written last, after a
smoke test (the slot's interpreter imports the package and reports the bundle's version);
a cut anywhere before leaves a slot without marker, which is wiped and rebuilt.

``shared_site`` is for test rigs only: instead of installing the dependencies, the slot
gets a ``.pth`` line naming a site-packages that already has them (the development venv),
and pip installs just the hallkiosk wheel (``--no-deps``). Everything else is the same path
a kiosk runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

from edge.update.errors import UpdateRefused
from edge.update.slots import MARKER, Slots, crash_point, write_json_atomic

BUNDLE_FORMAT = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(partial(f.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_bundle(out: Path, wheels: list[Path], version: str) -> Path:
    """Write a bundle tar holding ``wheels`` (the provisioning station's side)."""
    meta = json.dumps({"format": BUNDLE_FORMAT, "version": version,
                       "requirement": f"hallkiosk=={version}"}, sort_keys=True).encode()
    out = Path(out)
    with tarfile.open(out, "w") as tar:
        info = tarfile.TarInfo("bundle.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for w in wheels:
            tar.add(w, arcname=f"wheels/{Path(w).name}")
    return out


def _read_meta(tar: tarfile.TarFile) -> dict:
    try:
        member = tar.extractfile("bundle.json")
        meta = json.loads(member.read()) if member else None
    except (KeyError, ValueError) as exc:
        raise UpdateRefused("bad_bundle", f"bundle.json: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT \
            or not isinstance(meta.get("version"), str):
        raise UpdateRefused("bad_bundle", "bundle.json: not a format 1 bundle")
    return meta


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract a bundle: regular files and directories under plain relative names only.

    Checked here rather than left to ``extractall(filter="data")`` alone: the extraction
    filters came to Python 3.11 in 3.11.4, and Debian bookworm's python3 (what a kiosk's slots
    run) is 3.11.2, where the keyword is a TypeError (found by the QEMU update campaign).
    Where the filter exists it is applied too. The bundle's hash was verified against signed
    TUF metadata before this; this is the second line."""
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if (not (m.isfile() or m.isdir()) or not parts or Path(m.name).is_absolute()
                or any(part in ("..", "") for part in parts)):
            raise UpdateRefused("bad_bundle", f"{m.name!r}: not a plain file or directory "
                                "under a relative name")
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
    else:
        tar.extractall(dest)


def install(slots: Slots, slot: str, bundle: Path, sha256: str, *, python: str,
            shared_site: Path | None = None, timeout_s: float = 600.0) -> dict:
    """Build ``slot`` from ``bundle``. Returns the marker. Never touches the active slot."""
    if slots.active() == slot:
        raise UpdateRefused("bad_slot", f"slot {slot} is the running one")
    if sha256_file(bundle) != sha256:        # verified when downloaded; re-checked on disk
        raise UpdateRefused("tampered", f"{bundle.name}: sha256 changed on disk")
    dest = slots.path(slot)
    staging = slots.root / "staging"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    crash_point("update.install_wiped")
    staging.mkdir(parents=True)
    with tarfile.open(bundle) as tar:
        meta = _read_meta(tar)
        _extract(tar, staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    run = partial(subprocess.run, check=False, capture_output=True, text=True,
                  timeout=timeout_s)
    r = run([python, "-m", "venv", "--system-site-packages", "--without-pip", str(dest)])
    if r.returncode:
        raise UpdateRefused("install_failed", f"venv: {r.stderr.strip()[-200:]}")
    crash_point("update.install_venv")
    slot_py = dest / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(slot_py), "install", "--no-index",
           "--disable-pip-version-check", "--no-cache-dir", "--no-compile",
           "--find-links", str(staging / "wheels")]
    purelib = run([str(slot_py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    purelib_dir = purelib.stdout.strip()
    if purelib.returncode or not purelib_dir:
        raise UpdateRefused("install_failed", f"venv: {purelib.stderr.strip()[-200:]}")
    if shared_site is not None:
        Path(purelib_dir, "_hallkiosk_shared_site.pth").write_text(f"{shared_site}\n")
        pip += ["--no-deps", "--ignore-installed"]
    r = run([*pip, meta["requirement"]])
    if r.returncode:
        raise UpdateRefused("install_failed", f"pip: {r.stderr.strip()[-200:]}")
    # The unit runs -OO with PYTHONDONTWRITEBYTECODE (docs/unattended.md) and pip compiles
    # at -O0 only: without this the new slot's agent would compile every module of the
    # package at each start (seen under QEMU: a slot's start slowed past TimeoutStartSec).
    r = run([str(slot_py), "-OO", "-m", "compileall", "-q", purelib_dir])
    if r.returncode:
        raise UpdateRefused("install_failed", f"compileall: {(r.stdout + r.stderr).strip()[-200:]}")
    crash_point("update.install_pip")
    r = run([str(slot_py), "-c", "import hallkiosk; print(hallkiosk.__version__)"],
            cwd=str(slots.root))
    if r.returncode or r.stdout.strip() != meta["version"]:
        raise UpdateRefused("install_failed", f"smoke test: version {r.stdout.strip()!r} "
                            f"(expected {meta['version']}) {r.stderr.strip()[-120:]}")
    marker = {"version": meta["version"], "sha256": sha256, "bundle": bundle.name}
    # pip does not fsync what it writes: flush the slot to disk before the marker says it
    # is complete, or a power cut can leave a marked slot with empty files (the boot guard
    # would then roll it back, but only after max_trial_boots failed starts).
    os.sync()
    write_json_atomic(dest / MARKER, marker)
    shutil.rmtree(staging, ignore_errors=True)
    crash_point("update.installed")
    return marker


__all__ = ["BUNDLE_FORMAT", "build_bundle", "install", "sha256_file"]
