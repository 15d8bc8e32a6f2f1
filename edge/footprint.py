"""Keep the long-running agent small by ordinary means: -OO bytecode compiled ahead of time,
and the heap trimmed once start-up is over.

A Pi Zero 2 W has 512 MB for everything; ``make bench`` reports the idle agent's RSS (anonymous
and file-backed) beside mqtt-io's. Its libraries are imported normally; what is done here is
what any long-running Python service may do without replacing anything of theirs:

- ``precompile()`` (run by deploy/install.sh): the systemd unit runs ``python -OO`` with
  PYTHONDONTWRITEBYTECODE on a read-only root, pip compiles at -O0 only and Debian ships only
  -O0 bytecode, so without it the agent would compile every module at each start and keep
  the docstrings resident;
- ``release_startup_memory()`` (the agent, once READY): collect start-up's garbage and give
  free heap pages back to the kernel with glibc's ``malloc_trim``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def release_startup_memory() -> bool:
    """Collect the garbage of starting up and hand free heap pages back to the kernel
    (glibc ``malloc_trim``); False where the C library has no malloc_trim."""
    import ctypes
    import gc

    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)
    return True


#: What the agent process imports, and its X.509 helper (``python -m edge.tls``, which runs
#: with the agent's environment, so at -OO too, and imports provisioning's readers lazily).
AGENT_ENTRY_MODULES = ("hallkiosk.cli", "edge.agent", "edge.tls", "provisioning.ca",
                       "provisioning.crl", "provisioning.errors", "provisioning.trust")


def site_dirs() -> list[str]:
    """The package directories on sys.path (the venv's site-packages, and Debian's
    dist-packages where the venv sees the system's: picamera2 comes from apt)."""
    import os

    return [d for d in sys.path
            if os.path.basename(d) in ("site-packages", "dist-packages") and os.path.isdir(d)]


def precompile(optimize: int = 2, sites: list[str] | None = None) -> tuple[int, int]:
    """Write ``-OO`` bytecode (``optimize`` 2, what the systemd unit runs with) for what the
    agent may load, so it never compiles at start.

    - the standard library modules the agent and its X.509 helper import (found by importing
      them: compiling the whole library would take minutes on a Pi for modules never used);
    - every module in ``sites`` (default: ``site_dirs()``): the agent imports some of them
      only when configured (the QR pipeline's numpy and Pillow, a pin factory, picamera2).

    Returns (standard and agent modules compiled, site directories compiled).
    """
    import compileall
    import py_compile

    for name in AGENT_ENTRY_MODULES:
        importlib.import_module(name)
    files = sorted({f for m in list(sys.modules.values())
                    if isinstance(f := getattr(m, "__file__", None), str) and f.endswith(".py")})
    for path in files:
        target = importlib.util.cache_from_source(path, optimization="" if optimize == 0
                                                  else optimize)
        py_compile.compile(path, cfile=target, optimize=optimize, doraise=True)
    dirs = site_dirs() if sites is None else sites
    for directory in dirs:
        # A file that does not compile (a Python 2 leftover in dist-packages) is reported
        # and skipped: it cannot be what the agent imports.
        compileall.compile_dir(directory, quiet=1, optimize=optimize, workers=0)
    return len(files), len(dirs)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] != ["--precompile"] or len(args) % 2 != 1 \
            or any(flag != "--site-dir" for flag in args[1::2]):
        sys.exit("usage: python -m edge.footprint --precompile [--site-dir DIR]...")
    modules, sites = precompile(sites=args[2::2] or None)
    print(f"edge.footprint: {modules} standard and agent modules and {sites} package "
          "directories compiled for python -OO")
