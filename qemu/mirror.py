"""Which Debian mirror the image is bootstrapped from: whatever this machine's apt uses.

The mirror is never written into the repository: a machine in a hall network has its own
(an apt proxy, a local mirror), and the build must use it. We read the same files apt reads:
``/etc/apt/sources.list`` and ``/etc/apt/sources.list.d/*.list`` (one-line format) and
``*.sources`` (deb822 format, the default since Debian 12), and take the first ``deb`` entry
that serves the wanted suite with the ``main`` component. Files apt ignores (other
extensions, such as ``.disabled``) are ignored here too. Pure parsing: no network.

``HALLKIOSK_QEMU_MIRROR`` overrides the choice (it comes from the environment, so it still
stays out of the repository).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hallkiosk.errors import ConfigError

#: URI schemes debootstrap can fetch from (mirror+file: and tor+ need apt's own methods).
SUPPORTED_SCHEMES = ("http://", "https://", "file:/")
ENV_OVERRIDE = "HALLKIOSK_QEMU_MIRROR"


class MirrorNotFound(ConfigError, LookupError):
    """No apt source on this machine serves the wanted suite."""


@dataclass(frozen=True, slots=True)
class AptSource:
    """One ``deb`` source: a URI serving ``suites`` with ``components`` (``origin`` = file)."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str


def parse_one_line(text: str, origin: str = "") -> Iterator[AptSource]:
    """Sources in the one-line format: ``deb [opt=val ...] URI SUITE COMPONENT...``."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # Options in brackets may contain spaces between them; drop the whole bracket.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) < 3 or words[0] != "deb":
            continue
        yield AptSource(words[1], (words[2],), tuple(words[3:]), origin)


def parse_deb822(text: str, origin: str = "") -> Iterator[AptSource]:
    """Sources in deb822 format: stanzas of ``Field: value`` separated by blank lines."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        last: str | None = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and last is not None:
                fields[last] += " " + raw.strip()      # continuation line
                continue
            key, sep, value = raw.partition(":")
            if not sep:
                continue
            last = key.strip().lower()
            fields[last] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            yield AptSource(uri, suites, components, origin)


def read_sources(etc_apt: str | os.PathLike[str] = "/etc/apt") -> list[AptSource]:
    """Every ``deb`` source apt would read under ``etc_apt``, in apt's order."""
    base = Path(etc_apt)
    out: list[AptSource] = []
    main = base / "sources.list"
    if main.is_file():
        out += parse_one_line(main.read_text(errors="replace"), str(main))
    parts = base / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list" and path.is_file():
                out += parse_one_line(path.read_text(errors="replace"), str(path))
            elif path.suffix == ".sources" and path.is_file():
                out += parse_deb822(path.read_text(errors="replace"), str(path))
    return out


def choose_mirror(sources: Iterable[AptSource], suite: str) -> AptSource:
    """The first source that serves exactly ``suite`` (not ``suite-security``) with ``main``."""
    seen = []
    for src in sources:
        seen.append(src)
        if suite in src.suites and "main" in src.components \
                and src.uri.startswith(SUPPORTED_SCHEMES):
            return src
    origins = sorted({s.origin for s in seen}) or ["no apt source files"]
    raise MirrorNotFound(f"no apt source serves Debian '{suite}' main (read: {', '.join(origins)}); "
                         f"add one to /etc/apt/sources.list.d/ or set {ENV_OVERRIDE}")


def debian_mirror(suite: str, etc_apt: str | os.PathLike[str] = "/etc/apt",
                  environ: dict[str, str] | None = None) -> str:
    """The mirror URI to debootstrap ``suite`` from (the override first, then apt's sources)."""
    env = os.environ if environ is None else environ
    override = env.get(ENV_OVERRIDE, "").strip()
    if override:
        return override
    return choose_mirror(read_sources(etc_apt), suite).uri
