"""`make qemu-image`: an arm64 Debian image with the agent installed as on a Pi, cached.

    .venv/bin/python -m qemu.image [--cache DIR] [--rebuild] [--rebuild-base] [--print-dir]

Three layers, each cached under ``$HALLKIOSK_QEMU_CACHE`` (default
``$XDG_CACHE_HOME/hallkiosk-qemu``, i.e. ``~/.cache/hallkiosk-qemu``), each keyed by a hash of
its inputs and rebuilt only when they change:

    base-<key>/rootfs   debootstrap of Debian arm64 (minbase + systemd, udev, python3, the
                        guest agent, busybox-static) and the Debian arm64 kernel. Key: suite,
                        package list, recipe version. About 4 minutes cold.
    wheels-<key>/       the agent's pinned dependencies as arm64 wheels for Python 3.11,
                        downloaded by the host's pip (PyPI). Key: pyproject's pins.
    image-<key>/        vmlinuz, initrd.img, rootfs.img (raw ext4), manifest.json: the base
                        with deploy/install.sh run inside it, the QEMU-only pieces from
                        qemu/guest/, and the host-built initramfs. Key: base + wheels + every
                        file install.sh installs + qemu/guest + this recipe.

Steps that run arm64 code (debootstrap's second stage, apt, install.sh with its venv and
pip) run in a chroot through qemu-user-static and binfmt_misc. The Debian mirror comes
from this machine's apt sources (qemu/mirror.py). Needs root: debootstrap, chroot and
unshare do. Missing host packages are installed with apt-get (``apt-get update`` once first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hallkiosk.errors import HallkioskError

from .initramfs import ROOT_MODULES, build_initramfs
from .mirror import debian_mirror

REPO = Path(__file__).resolve().parent.parent
GUEST = Path(__file__).resolve().parent / "guest"

SUITE = "bookworm"
ARCH = "arm64"
#: Debian's python3 in bookworm; the wheels must match it.
GUEST_PYTHON = "3.11"
BASE_PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "python3", "python3-venv",
                 "qemu-guest-agent", "busybox-static", "iproute2", "procps")
KERNEL_PACKAGE = "linux-image-arm64"
#: Bump when a step changes what it produces, so old caches are not reused.
BASE_RECIPE = 1
IMAGE_RECIPE = 1
#: Free space left in the root file system (journal, the agent's state, logs).
FREE_SPACE_MB = 1024

#: Host command -> Debian package that provides it.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-img": "qemu-utils",
    "mke2fs": "e2fsprogs",
    "update-binfmts": "binfmt-support",
    "dpkg-deb": "dpkg",
    "unshare": "util-linux",
    "mosquitto": "mosquitto",
}
BINFMT_INTERPRETERS = ("/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "/usr/bin/qemu-aarch64-static")
QEMU_USER_PACKAGE = "qemu-user-static"

#: What deploy/install.sh installs (pip builds the package from these): the image key hashes them.
SOURCE_PATHS = ("pyproject.toml", "README.md", "deploy/", "docs/agent.example.toml",
                "hallkiosk/", "edge/", "boards/", "mqtt_topics/", "provisioning/", "emulator/", "ops/")
GUEST_SRC = "/tmp/hallkiosk-src"
GUEST_WHEELS = "/tmp/hallkiosk-wheels"
GUEST_SHIMS = "/tmp/hallkiosk-shims"


class ImageError(HallkioskError, RuntimeError):
    """The image could not be built (the message says which step and where its log is)."""


# -- where things live ----------------------------------------------------------------------------
def cache_root(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("HALLKIOSK_QEMU_CACHE"):
        return Path(env["HALLKIOSK_QEMU_CACHE"])
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "hallkiosk-qemu"


@dataclass(frozen=True)
class BuiltImage:
    """A finished image directory: what qemu/harness.py boots."""

    dir: Path
    key: str
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_version: str

    @classmethod
    def load(cls, d: Path) -> "BuiltImage":
        m = json.loads((d / "manifest.json").read_text())
        return cls(d, m["key"], d / "vmlinuz", d / "initrd.img", d / "rootfs.img",
                   m["kernel_version"])


# -- input hashing ----------------------------------------------------------------------------------
def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]


def source_files(repo: Path = REPO) -> list[str]:
    """Files under SOURCE_PATHS, as git sees them (tracked and untracked, not ignored)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                             check=True, capture_output=True).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
    keep = [n for n in names
            if any(n == s or (s.endswith("/") and n.startswith(s)) for s in SOURCE_PATHS)
            and "__pycache__" not in n and not n.endswith(".pyc") and (repo / n).is_file()]
    return sorted(keep)


def files_digest(root: Path, names: Sequence[str]) -> str:
    return _digest(x for n in names for x in (n.encode(), (root / n).read_bytes()))


def base_key() -> str:
    return _digest([json.dumps({"recipe": BASE_RECIPE, "suite": SUITE, "arch": ARCH,
                                "packages": BASE_PACKAGES, "kernel": KERNEL_PACKAGE}).encode()])


def requirements(repo: Path = REPO) -> list[str]:
    """The agent's pinned dependencies plus what pip needs to build the package itself."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    build = meta.get("build-system", {}).get("requires", [])
    return sorted(meta["project"]["dependencies"]) + sorted(build)


def wheels_key(reqs: Sequence[str]) -> str:
    return _digest([json.dumps({"reqs": list(reqs), "py": GUEST_PYTHON, "arch": ARCH}).encode()])


def guest_files() -> list[str]:
    return sorted(p.name for p in GUEST.iterdir() if p.is_file())


def image_key(bkey: str, wkey: str, repo: Path = REPO) -> str:
    here = Path(__file__).resolve().parent
    return _digest([bkey.encode(), wkey.encode(), str(IMAGE_RECIPE).encode(),
                    files_digest(repo, source_files(repo)).encode(),
                    files_digest(GUEST, guest_files()).encode(),
                    files_digest(here, ["image.py", "initramfs.py"]).encode()])


# -- progress ---------------------------------------------------------------------------------------
class Progress:
    """One line per step with its time; long commands print a heartbeat line (the latest
    output line) every ``beat_s`` seconds, so `make qemu-image` never looks stuck. Everything
    a command prints goes to ``log`` in full."""

    def __init__(self, total: int, log: Path, *, out=None, beat_s: float = 10.0) -> None:
        self.total = total
        self.n = 0
        self.log = log
        self.out = out or sys.stdout
        self.beat_s = beat_s
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        print(f"[qemu-image {time.monotonic() - self.t0:6.1f}s] {text}", file=self.out, flush=True)

    def step(self, title: str):
        self.n += 1
        return _Step(self, f"{self.n}/{self.total} {title}")

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        """Run a command, its output to the log, a heartbeat to the terminal."""
        last = [b""]

        def copy(pipe, logf) -> None:
            for line in pipe:
                logf.write(line)
                if line.strip():
                    last[0] = line.strip()

        with self.log.open("ab") as logf:
            logf.write(f"\n$ {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            reader = threading.Thread(target=copy, args=(proc.stdout, logf), daemon=True)
            reader.start()
            while True:
                try:
                    rc = proc.wait(self.beat_s)
                    break
                except subprocess.TimeoutExpired:
                    self.say("    ... " + (last[0].decode(errors="replace")[:100] or "(working)"))
            reader.join()
        if rc != 0:
            raise ImageError(f"`{' '.join(argv[:3])} ...` failed (exit {rc}); full log: {self.log}")


class _Step:
    def __init__(self, progress: Progress, title: str) -> None:
        self.p = progress
        self.title = title

    def __enter__(self) -> "_Step":
        self.start = time.monotonic()
        self.p.say(self.title)
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        took = time.monotonic() - self.start
        self.p.timings[self.title.split(" ", 1)[1]] = round(took, 1)
        if exc_type is None:
            self.p.say(f"    done in {took:.1f} s")


# -- host preparation -------------------------------------------------------------------------------
def _have(cmd: str) -> bool:
    return shutil.which(cmd) is not None or any(
        os.access(os.path.join(d, cmd), os.X_OK) for d in ("/usr/sbin", "/sbin"))


def missing_host_packages() -> list[str]:
    need = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if not _have(cmd)})
    if not any(os.access(p, os.X_OK) for p in BINFMT_INTERPRETERS):
        need.append(QEMU_USER_PACKAGE)
    return need


def ensure_host_packages(progress: Progress | None = None) -> None:
    need = missing_host_packages()
    if not need:
        return
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *need]
    if os.geteuid() != 0:
        raise ImageError("missing Debian packages; as root run: apt-get update && " + " ".join(cmd))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if progress is not None:
        progress.say(f"installing host packages: {' '.join(need)}")
        # The package lists may be empty or old on a fresh machine: update once, first.
        progress.run(["apt-get", "update", "-q"], env=env)
        progress.run(cmd, env=env)
    else:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(cmd, check=True, env=env)


def ensure_binfmt() -> None:
    """arm64 ELF files must run through qemu-user (flag F: the interpreter is opened at
    registration, so it works inside the chroot without copying it there)."""
    mnt = Path("/proc/sys/fs/binfmt_misc")
    if not (mnt / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(mnt)], check=True)
    entry = mnt / "qemu-aarch64"
    if not entry.exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)
    text = entry.read_text() if entry.exists() else ""
    if "enabled" not in text.splitlines()[:1]:
        raise ImageError(f"{entry}: qemu-aarch64 is not registered and enabled with binfmt_misc")
    flags = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags:")), "")
    if "F" not in flags:
        raise ImageError(f"{entry}: registered without the F flag; chroot would not find qemu")


# -- the chroot ----------------------------------------------------------------------------------------
# SYSTEMD_OFFLINE: systemctl would decide "chroot" by comparing / with /proc/1/root, which a
# sandboxed build host may not let us read; told outright, it enables units offline and
# skips daemon-reload/daemon-reexec instead of failing to reach a systemd that is not there.
_CHROOT_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
               "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_OFFLINE=1"]


def chroot_argv(root: Path, argv: Sequence[str], env: Sequence[str] = ()) -> list[str]:
    """A command in ``root`` with /proc, /sys and /dev mounted in a private mount namespace,
    so the mounts vanish with the command even if the build is interrupted."""
    script = ('mount -t proc proc "$0/proc" && mount -t sysfs sysfs "$0/sys" && '
              'mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--fork", "--", "sh", "-c", script,
            str(root), *_CHROOT_ENV, *env, *argv]


# -- layer 1: base ----------------------------------------------------------------------------------
def _noinitramfs_deb(dest: Path, work: Path) -> None:
    """A two-line package that Provides linux-initramfs-tool, so the kernel installs without
    initramfs-tools (whose mkinitramfs would take 10+ minutes under user-mode emulation)."""
    pkg = work / "noinitramfs"
    (pkg / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: hallkiosk-qemu-no-initramfs\nVersion: 1\nArchitecture: all\n"
        "Maintainer: hallkiosk <hallkiosk@example.invalid>\nProvides: linux-initramfs-tool\n"
        "Description: the QEMU image's initramfs is built on the host (qemu/initramfs.py)\n"
        " Satisfies the kernel's dependency on an initramfs generator.\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(dest)], check=True,
                   capture_output=True)


def build_base(cache: Path, key: str, progress: Progress) -> Path:
    final = cache / f"base-{key}"
    if (final / "ok.json").is_file():
        progress.say(f"base layer cached: {final}")
        return final / "rootfs"
    mirror = debian_mirror(SUITE)
    work = cache / f"base-{key}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = work / "rootfs"
    with progress.step(f"debootstrap Debian {SUITE} {ARCH} (minbase + {len(BASE_PACKAGES)} packages)"):
        # The mirror is from this machine's apt sources; it goes into the image's own
        # /etc/apt/sources.list (in the cache, never into the repository).
        progress.run(["debootstrap", f"--arch={ARCH}", "--variant=minbase", "--components=main",
                      "--include=" + ",".join(BASE_PACKAGES), SUITE, str(root), mirror])
    with progress.step(f"install the Debian {ARCH} kernel (no initramfs-tools)"):
        _noinitramfs_deb(root / "tmp" / "noinitramfs.deb", work)
        progress.run(chroot_argv(root, ["sh", "-c",
                     "dpkg -i /tmp/noinitramfs.deb && apt-get update -q && "
                     f"apt-get install -y -q --no-install-recommends {KERNEL_PACKAGE} && "
                     "apt-get clean && rm -rf /var/lib/apt/lists/* /tmp/noinitramfs.deb"]))
    (work / "ok.json").write_text(json.dumps({"key": key, "suite": SUITE, "arch": ARCH,
                                              "packages": BASE_PACKAGES}))
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return final / "rootfs"


# -- layer 2: wheels --------------------------------------------------------------------------------
def _platform_args() -> list[str]:
    # bookworm's glibc is 2.36: any manylinux wheel up to that runs there.
    tags = ["manylinux2014_aarch64"] + [f"manylinux_2_{n}_aarch64" for n in range(17, 37)]
    return [x for t in tags for x in ("--platform", t)]


def build_wheels(cache: Path, key: str, reqs: Sequence[str], progress: Progress) -> Path:
    final = cache / f"wheels-{key}"
    if (final / "ok.json").is_file():
        progress.say(f"wheels cached: {final}")
        return final
    work = cache / f"wheels-{key}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with progress.step(f"download {len(reqs)} pinned requirements as {ARCH} wheels (host pip)"):
        progress.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                      "--only-binary=:all:", *_platform_args(), "--python-version", GUEST_PYTHON,
                      "--implementation", "cp", "-d", str(work), *reqs])
    (work / "ok.json").write_text(json.dumps({"reqs": list(reqs)}))
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return final


# -- layer 3: the image ---------------------------------------------------------------------------------
def _copy_sources(dest: Path, repo: Path = REPO) -> int:
    names = source_files(repo)
    for n in names:
        target = dest / n
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / n, target)
    return len(names)


def _install_guest_pieces(root: Path) -> None:
    def put(name: str, dest: str, mode: int = 0o644) -> None:
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GUEST / name, target)
        target.chmod(mode)

    put("10-qemu-user.network", "/etc/systemd/network/10-qemu-user.network")
    put("90-hallkiosk-qemu.rules", "/etc/udev/rules.d/90-hallkiosk-qemu.rules")
    put("hallkiosk-seed.service", "/etc/systemd/system/hallkiosk-seed.service")
    put("hallkiosk-seed", "/usr/local/sbin/hallkiosk-seed", 0o755)
    put("autologin.conf", "/etc/systemd/system/serial-getty@ttyAMA0.service.d/autologin.conf")
    (root / "etc/fstab").write_text("# hallkiosk QEMU image: the initramfs mounts / read-write\n"
                                    "/dev/vda / ext4 rw,noatime 0 0\n")
    (root / "etc/hostname").write_text("hallkiosk-qemu\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 hallkiosk-qemu\n")
    # No DNS in the guest: the only peer is the broker, addressed by IP.
    (root / "etc/resolv.conf").unlink(missing_ok=True)


def build_image(*, cache: Path | None = None, rebuild: bool = False, rebuild_base: bool = False,
                out=None) -> BuiltImage:
    """Build (or find in the cache) the image for the current tree; returns its paths."""
    if os.geteuid() != 0:
        raise ImageError("building the image needs root (debootstrap, chroot); run it as root")
    cache = (cache or cache_root()).absolute()
    cache.mkdir(parents=True, exist_ok=True)
    reqs = requirements()
    bkey, wkey = base_key(), wheels_key(reqs)
    ikey = image_key(bkey, wkey)
    final = cache / f"image-{ikey}"
    log = cache / "build.log"
    steps = 5 + (0 if (cache / f"base-{bkey}" / "ok.json").is_file() and not rebuild_base else 2) \
        + (0 if (cache / f"wheels-{wkey}" / "ok.json").is_file() else 1)
    progress = Progress(steps, log, out=out)
    if not rebuild and not rebuild_base and (final / "manifest.json").is_file():
        progress.say(f"image cached (inputs unchanged): {final}")
        return BuiltImage.load(final)
    log.write_text(f"hallkiosk qemu-image build {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    progress.say(f"building image {ikey} in {cache} (log: {log})")
    ensure_host_packages(progress)
    ensure_binfmt()
    if rebuild_base:
        shutil.rmtree(cache / f"base-{bkey}", ignore_errors=True)
    base_root = build_base(cache, bkey, progress)
    wheels = build_wheels(cache, wkey, reqs, progress)

    work = cache / f"image-{ikey}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = work / "rootfs"
    with progress.step("copy the base layer"):
        subprocess.run(["cp", "-a", "--reflink=auto", str(base_root), str(root)], check=True)
    with progress.step("deploy/install.sh in the arm64 chroot (venv, package, unit, udev)"):
        n = _copy_sources(root / GUEST_SRC.lstrip("/"))
        shutil.copytree(wheels, root / GUEST_WHEELS.lstrip("/"))
        shim = root / GUEST_SHIMS.lstrip("/") / "udevadm"
        shim.parent.mkdir(parents=True)
        shutil.copyfile(GUEST / "chroot-udevadm", shim)
        shim.chmod(0o755)
        progress.say(f"    {n} source files, {len(list(wheels.glob('*.whl')))} wheels")
        # pip reads these from the environment: no index, only the wheels fetched on the host.
        progress.run(chroot_argv(root, ["bash", f"{GUEST_SRC}/deploy/install.sh", "--src", GUEST_SRC,
                                        "--no-start"],
                                 env=[f"PATH={GUEST_SHIMS}:/usr/sbin:/usr/bin:/sbin:/bin",
                                      "PIP_NO_INDEX=1", f"PIP_FIND_LINKS={GUEST_WHEELS}",
                                      "PIP_NO_WARN_SCRIPT_LOCATION=1"]))
    with progress.step("QEMU-only pieces (seed unit, network, serial names, console)"):
        _install_guest_pieces(root)
        progress.run(chroot_argv(root, ["systemctl", "enable", "systemd-networkd.service",
                                        "hallkiosk-seed.service"]))
        for d in (GUEST_SRC, GUEST_WHEELS, GUEST_SHIMS):
            shutil.rmtree(root / d.lstrip("/"), ignore_errors=True)
    out_dir = work / "image"
    out_dir.mkdir()
    with progress.step("initramfs (host-built) and kernel"):
        versions = sorted(p.name for p in (root / "lib/modules").iterdir())
        if len(versions) != 1:
            raise ImageError(f"expected one kernel in the image, found {versions}")
        kver = versions[0]
        initrd, mods = build_initramfs(root, kver, (GUEST / "init").read_bytes(), ROOT_MODULES)
        (out_dir / "initrd.img").write_bytes(initrd)
        shutil.copyfile(root / "boot" / f"vmlinuz-{kver}", out_dir / "vmlinuz")
        progress.say(f"    kernel {kver}, initramfs {len(initrd) // 1024} KiB: {' '.join(mods)}")
    with progress.step("pack the root file system (mke2fs -d)"):
        used_mb = int(subprocess.run(["du", "-sm", str(root)], check=True, capture_output=True,
                                     text=True).stdout.split()[0])
        size_mb = (used_mb * 12 // 10 + FREE_SPACE_MB + 63) // 64 * 64
        progress.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "hallkiosk-root", "-d", str(root),
                      str(out_dir / "rootfs.img"), f"{size_mb}M"])
    manifest = {"key": ikey, "base_key": bkey, "wheels_key": wkey, "suite": SUITE, "arch": ARCH,
                "kernel_version": kver, "initramfs_modules": mods,
                "rootfs_mb": size_mb, "used_mb": used_mb,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings_s": progress.timings}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(root)
    shutil.rmtree(final, ignore_errors=True)
    out_dir.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    prune(cache, keep={final.name, f"base-{bkey}", f"wheels-{wkey}"})
    progress.say(f"image ready in {time.monotonic() - progress.t0:.1f} s: {final}")
    return BuiltImage.load(final)


def prune(cache: Path, keep: set[str]) -> None:
    """Drop other layers (images are ~1 GB each): only the current build's are kept."""
    for d in cache.iterdir():
        if d.is_dir() and d.name.split("-", 1)[0] in ("image", "base", "wheels") and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def find_image(cache: Path | None = None) -> BuiltImage | None:
    """The image for the current tree if it is in the cache (no build, no root needed).

    ``HALLKIOSK_QEMU_IMAGE`` names an image directory to use instead (an older build, while
    sources change under you: the guest then runs the agent that image was built from)."""
    if os.environ.get("HALLKIOSK_QEMU_IMAGE"):
        return BuiltImage.load(Path(os.environ["HALLKIOSK_QEMU_IMAGE"]))
    cache = cache or cache_root()
    d = cache / f"image-{image_key(base_key(), wheels_key(requirements()))}"
    return BuiltImage.load(d) if (d / "manifest.json").is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qemu.image", description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="cache directory (default: %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the image layer")
    p.add_argument("--rebuild-base", action="store_true", help="rebuild from debootstrap on")
    p.add_argument("--print-dir", action="store_true",
                   help="print the cached image's directory for this tree and exit (1: not built)")
    args = p.parse_args(argv)
    if args.print_dir:
        img = find_image(args.cache)
        if img is None:
            return 1
        print(img.dir)
        return 0
    try:
        build_image(cache=args.cache, rebuild=args.rebuild, rebuild_base=args.rebuild_base)
    except HallkioskError as exc:
        print(f"qemu-image: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
