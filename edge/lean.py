"""Keep the long-running agent small: defer standard-library modules it never uses.

The agent's memory budget is 30 MB resident (a Pi Zero 2 W has 512 MB for everything). Two
of its libraries import, at their top, standard modules that the agent's code paths never
call, and those cost more resident memory than the agent's own code:

- paho-mqtt imports ``urllib.request`` (which brings ``http.client`` and the ``email``
  package) only to read proxy settings, and reads them only when PySocks is installed;
- gpiozero imports ``importlib.metadata`` (``email``, ``zipfile``, ``csv``...) to look up pin
  factories by entry-point name, ``statistics`` (``fractions``, ``decimal``) for the
  averaging of analogue sensors, ``colorzero`` for RGB LEDs and ``importlib.resources`` for
  its board data;
- ``difflib`` serves only the "did you mean" of a configuration error;
- ``inspect`` and ``linecache`` import ``tokenize``, ``urllib.parse`` imports ``ipaddress``,
  for work the agent never asks of them;
- gpiozero's own package ``__init__`` imports every device family it has;
- argparse's help formatter imports ``shutil``, which imports ``bz2`` and ``lzma`` (and their
  C libraries) only to learn that archives could be made;
- ``socket.getaddrinfo`` encodes a host name with the ``idna`` codec, whose module imports
  ``stringprep`` and ``unicodedata`` (nameprep tables) even for "127.0.0.1"; an ASCII name
  never needs them (``_AsciiIdna``).

``defer_stdlib()`` installs, before those libraries are imported, stand-ins that load the
real module the first time anything in it is used, so behaviour never changes, only the
moment of loading: a name imported with ``from x import name`` becomes a small function that
loads ``x`` when called. It is called by ``hallkiosk agent`` only (tests and tools import
normally), and does nothing for a module that is already loaded. Measured by ``make bench``
(idle RSS) and checked by tests/test_lean.py, which also proves the stand-ins load the real
thing when used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

#: module -> the names other modules take from it with ``from module import name``
#: (each must be a function there: it is replaced by a loader that calls the real one).
DEFERRED: dict[str, tuple[str, ...]] = {
    "urllib.request": (),
    "importlib.metadata": ("entry_points",),
    "statistics": ("median", "mean"),
    "importlib.resources": ("files", "as_file"),
    "colorzero": ("Color",),        # gpiozero's RGBLED only (fractions, decimal)
    "uuid": (),                     # paho: random client ids, websockets; ours are fixed
    "difflib": ("get_close_matches",),   # "did you mean" in config errors
    # gpiozero's package __init__ imports every device family (boards, SPI, tones, internal
    # devices...): the agent imports the modules it uses directly (gpiozero.input_devices,
    # gpiozero.output_devices, gpiozero.pins.*), and the package body runs only if some
    # code asks the package itself for a name.
    "gpiozero": (),
    # argparse's help formatter imports shutil (terminal size), which imports the bz2 and
    # lzma modules (and their C libraries) only to learn that archives could be made: the
    # agent's command line is parsed after defer_stdlib() (hallkiosk.cli.main).
    "bz2": (),
    "lzma": (),
    # inspect (dataclasses and gpiozero need it) and linecache import tokenize at their top
    # for reading source files (getsource, a traceback's source lines); urllib.parse
    # (pathlib) imports ipaddress for bracketed hosts in URLs. (inspect needs ast at import:
    # it subclasses ast.NodeVisitor.)
    "tokenize": (),
    "ipaddress": (),
}

_lock = threading.RLock()


class _Deferred(types.ModuleType):
    """A stand-in module: any attribute access loads the real module and answers from it."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__") and name != "__all__":
            # The import system probes dunders (__path__, __file__...) on every from-import;
            # answering them must not load the module. (__all__ is asked by a star-import,
            # which needs the real names.)
            raise AttributeError(name)
        real = _load(self.__name__)
        return getattr(real, name)

    def __dir__(self) -> list[str]:
        return dir(_load(self.__name__))


def _load(name: str) -> types.ModuleType:
    """Replace the stand-in of ``name`` by the real module (once) and return it."""
    with _lock:
        current = sys.modules.get(name)
        if current is not None and not isinstance(current, _Deferred):
            return current
        stand_in = current
        sys.modules.pop(name, None)
        try:
            real = importlib.import_module(name)
        except BaseException:
            if stand_in is not None:
                sys.modules[name] = stand_in
            raise
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, real)
        # Submodules imported while the stand-in was there were bound on the stand-in, and
        # the import system binds a submodule on its package only on its first import.
        prefix = name + "."
        for sub, module in list(sys.modules.items()):
            if sub.startswith(prefix) and "." not in sub[len(prefix):] \
                    and not hasattr(real, sub[len(prefix):]):
                setattr(real, sub[len(prefix):], module)
        return real


def _forward(module: str, attr: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_load(module), attr)(*args, **kwargs)
    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"Loads {module} on first use, then calls {module}.{attr}."
    return call


def defer_stdlib(modules: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Install stand-ins for ``modules`` (default DEFERRED) that are not loaded yet; return
    the names deferred."""
    done = []
    with _lock:
        for name, names in (DEFERRED if modules is None else modules).items():
            spec = None if name in sys.modules else importlib.util.find_spec(name)
            if spec is None:
                continue
            stand_in = _Deferred(name)
            stand_in.__spec__ = spec          # find_spec() of a loaded module reads this
            if spec.submodule_search_locations is not None:
                stand_in.__path__ = list(spec.submodule_search_locations)
            for attr in names:
                setattr(stand_in, attr, _forward(name, attr))
            sys.modules[name] = stand_in
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(importlib.import_module(parent), child, stand_in)
            done.append(name)
        if "encodings.idna" not in sys.modules:
            idna = _AsciiIdna("encodings.idna")
            idna.__spec__ = importlib.util.find_spec("encodings.idna")
            sys.modules["encodings.idna"] = idna
            done.append("encodings.idna")
    return done


class _AsciiIdna(_Deferred):
    """Stand-in for ``encodings.idna``: the codec's fast path for ASCII names (the same
    checks, byte for byte: Python's own codec encodes an ASCII name as itself after checking
    label lengths), and the real module for anything else, loaded on first need.

    The codec registry caches what ``getregentry`` returns, so the CodecInfo built here stays
    the ``idna`` codec for the life of the process: its slow path and its incremental and
    stream classes call into the real module rather than being replaced by it.
    """

    def __getattr__(self, name: str) -> Any:
        if name == "getaliases":
            # The codec search asks for it; the real module has none either.
            raise AttributeError(name)
        return super().__getattr__(name)

    def getregentry(self) -> Any:
        import codecs

        def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
            if errors == "strict" and type(text) is str and text.isascii():
                labels = text.split(".")
                if all(0 < len(label) < 64 for label in labels[:-1]) and len(labels[-1]) < 64:
                    return text.encode("ascii"), len(text)
            return _real_idna().Codec().encode(text, errors)

        def decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
            return _real_idna().Codec().decode(data, errors)

        def lazy(cls_name: str) -> Callable[..., Any]:
            def make(*args: Any, **kwargs: Any) -> Any:
                return getattr(_real_idna(), cls_name)(*args, **kwargs)
            return make

        return codecs.CodecInfo(name="idna", encode=encode, decode=decode,
                                incrementalencoder=lazy("IncrementalEncoder"),
                                incrementaldecoder=lazy("IncrementalDecoder"),
                                streamwriter=lazy("StreamWriter"),
                                streamreader=lazy("StreamReader"))


def _real_idna() -> types.ModuleType:
    return _load("encodings.idna")


def loaded(name: str) -> bool:
    """Whether the real ``name`` has been loaded (False while only its stand-in is there)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Deferred)


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
    agent may load, so it never compiles at start: its unit runs with PYTHONDONTWRITEBYTECODE
    on a read-only root, pip compiles at -O0 only, and Debian ships only -O0 bytecode.

    - the standard library modules the agent and its X.509 helper import (found by importing
      them: compiling the whole library would take minutes on a Pi for modules never used),
      and those it defers;
    - every module in ``sites`` (default: ``site_dirs()``): the agent imports some of them
      only when configured (the QR pipeline's numpy and Pillow, a pin factory, picamera2).

    Returns (standard modules compiled, site directories compiled).
    """
    import compileall
    import py_compile

    defer_stdlib()
    for name in AGENT_ENTRY_MODULES:
        importlib.import_module(name)
    for name in DEFERRED:
        _load(name)                   # used later (or never): compiled all the same
    _real_idna()
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
        sys.exit("usage: python -m edge.lean --precompile [--site-dir DIR]...")
    chosen = args[2::2] or None
    modules, sites = precompile(sites=chosen)
    print(f"edge.lean: {modules} standard and agent modules and {sites} package "
          "directories compiled for python -OO")
