"""A small initramfs for the QEMU image, built on the host in well under a second.

Why: Debian's arm64 kernel has virtio-blk and ext4 as modules, so it cannot mount the root
disk on its own; Debian's own mkinitramfs, run under user-mode emulation, takes more than
ten minutes. What the boot needs is small: busybox (static, from the image's own
``busybox-static`` package), the modules for the root disk in dependency order, and a
20-line ``/init`` (qemu/guest/init) that loads them, mounts the root and switches to it.
udev in the real root loads everything else (network, serial, rng, guest agent port).

Pure pieces, testable without a kernel: :func:`parse_modules_dep`, :func:`load_order`
(dependencies from ``modules.dep``, soft dependencies from ``modules.softdep``, aliases from
``modules.alias``, built-ins from ``modules.builtin``) and :class:`CpioWriter` (the kernel's
"newc" format, Documentation/driver-api/early-userspace/buffer-format.rst).
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from hallkiosk.errors import ConfigError

#: What the root disk needs on `-M virt`: the PCI transport, the block driver, the file system.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "ext4")

_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class ModuleError(ConfigError, LookupError):
    """A module the initramfs needs is neither a module nor built into this kernel."""


def module_name(path: str) -> str:
    """``kernel/fs/ext4/ext4.ko.xz`` -> ``ext4``; modprobe treats ``-`` and ``_`` alike."""
    base = PurePosixPath(path).name
    for suffix in _KO_SUFFIXES[::-1]:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``modules.dep`` -> {name: (path, dependency paths)} (paths relative to the module dir)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if not sep or not path.strip():
            continue
        out[module_name(path.strip())] = (path.strip(), tuple(deps.split()))
    return out


def parse_softdeps(text: str) -> dict[str, tuple[str, ...]]:
    """``softdep NAME pre: A B post: C`` -> {NAME: (A, B)}: only ``pre`` matters before mount."""
    out: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        pre: list[str] = []
        mode = None
        for w in words[2:]:
            if w.endswith(":"):
                mode = w[:-1]
            elif mode == "pre":
                pre.append(w)
        out[words[1].replace("-", "_")] = tuple(pre)
    return out


def parse_aliases(text: str) -> dict[str, str]:
    """``alias crc32c crc32c_generic`` -> {"crc32c": "crc32c_generic"} (exact aliases only)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
            out.setdefault(words[1].replace("-", "_"), words[2].replace("-", "_"))
    return out


def parse_builtin(text: str) -> frozenset[str]:
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class ModuleIndex:
    """The four index files depmod writes into ``/lib/modules/<version>/``."""

    deps: Mapping[str, tuple[str, tuple[str, ...]]]
    softdeps: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    builtin: frozenset[str] = frozenset()

    @classmethod
    def from_dir(cls, moddir: Path) -> "ModuleIndex":
        def read(name: str) -> str:
            p = moddir / name
            return p.read_text(errors="replace") if p.is_file() else ""

        if not (moddir / "modules.dep").is_file():
            raise ModuleError(f"{moddir}: no modules.dep (depmod has not run for this kernel)")
        return cls(parse_modules_dep(read("modules.dep")), parse_softdeps(read("modules.softdep")),
                   parse_aliases(read("modules.alias")), parse_builtin(read("modules.builtin")))

    def resolve(self, name: str) -> str | None:
        """The module a name or alias stands for; None if it is built in."""
        n = name.replace("-", "_")
        if n in self.deps:
            return n
        if n in self.builtin:
            return None
        target = self.aliases.get(n)
        if target is not None:
            return self.resolve(target) if target != n else None
        raise ModuleError(f"module {name!r} is neither a module nor built into this kernel")


def load_order(index: ModuleIndex, wanted: Iterable[str]) -> list[str]:
    """Module paths to insmod, each after everything it needs (modules.dep order + softdeps).

    A soft dependency that this kernel does not have is skipped, as modprobe does; a wanted
    module that is missing raises :class:`ModuleError`.
    """
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, soft: bool) -> None:
        try:
            mod = index.resolve(name)
        except ModuleError:
            if soft:
                return
            raise
        if mod is None or mod in done:
            return
        done.add(mod)                       # before recursing: dependency cycles end here
        path, deps = index.deps[mod]
        for pre in index.softdeps.get(mod, ()):
            visit(pre, True)
        # modules.dep lists a module's dependencies, closest first; the deepest loads first.
        for dep in reversed(deps):
            visit(module_name(dep), False)
        order.append(path)

    for w in wanted:
        visit(w, False)
    return order


# -- cpio "newc" --------------------------------------------------------------------------------
_MAGIC = b"070701"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Writes a newc archive: 110-byte ASCII header, name + NUL padded to 4, data padded to 4.

    Times are 0 and owners root, so the same inputs give the same bytes (cache keys stay
    meaningful and the archive can be compared in tests).
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + encoded + b"\0" * _pad4(len(header) + len(encoded)))
        self._buf.write(data + b"\0" * _pad4(len(data)))

    def directory(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | mode, nlink=2)

    def _parent(self, name: str) -> str:
        name = name.strip("/")
        if "/" in name:
            self.directory(name.rsplit("/", 1)[0])
        return name

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parent(name), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(self._parent(name), stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parent(name), stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        data = self._buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def _module_bytes(path: Path) -> bytes:
    """busybox insmod wants a plain ELF: unpack .ko.xz/.ko.gz here, on the host."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        raise ModuleError(f"{path}: zstd-compressed modules are not supported here")
    return data


def build_initramfs(rootfs: Path, kernel_version: str, init_script: bytes,
                    modules: Iterable[str] = ROOT_MODULES) -> tuple[bytes, list[str]]:
    """gzip'd newc archive for ``kernel_version`` from the image tree at ``rootfs``.

    Returns (archive, module names in load order). Layout inside: /init, /bin/busybox,
    /lib/modules/<name>.ko (flat), /etc/modules.order, /dev/console.
    """
    moddir = rootfs / "lib" / "modules" / kernel_version
    busybox = rootfs / "bin" / "busybox"
    if not busybox.is_file():
        raise ModuleError(f"{busybox}: missing (the image needs the busybox-static package)")
    order = load_order(ModuleIndex.from_dir(moddir), modules)
    cpio = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "newroot", "etc", "lib/modules"):
        cpio.directory(d)
    # The kernel opens /dev/console for /init's stdio before /init can mount devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init_script, 0o755)
    names = []
    for rel in order:
        name = module_name(rel)
        names.append(name)
        cpio.file(f"lib/modules/{name}.ko", _module_bytes(moddir / rel))
    cpio.file("etc/modules.order", "".join(f"{n}.ko\n" for n in names).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0), names
