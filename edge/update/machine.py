"""The update state machine (states in edge.update.slots): request, prepare, switch, commit,
rollback. Each step reads the durable state, checks it may run, writes the next state.

``prepare`` is the slow one (TUF refresh, download, install into the other slot): the
agent runs it as a child process (``python -m edge.update prepare``) so its main loop
never blocks; it is resumable, so the agent simply starts it again after a restart or a
power cut. ``switch`` and ``commit`` are quick and run in the agent itself, because only
the agent knows whether a citizen is in session or a ticket is unacknowledged.
"""

from __future__ import annotations

import logging
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.update.errors import UpdateRefused
from edge.update.slots import DEFAULT_MAX_TRIAL_BOOTS, SLOTS, Slots, crash_point, now_ms
from hallkiosk.errors import ConfigError

log = logging.getLogger("hallkiosk.update")

#: States in which an update is under way (a second request for another target waits).
IN_PROGRESS = ("preparing", "installed", "switching", "trial")
DEFAULT_DEADLINE_S = 300


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    """``update.toml`` next to agent.toml (written by ``hallkiosk provision release
    kiosk-conf``). Paths are absolute on a kiosk."""

    root: Path
    repository: str
    ca_file: Path
    trusted_root: Path
    python: str = "/usr/bin/python3"
    health_deadline_s: int = DEFAULT_DEADLINE_S
    max_trial_boots: int = DEFAULT_MAX_TRIAL_BOOTS
    shared_site: Path | None = None
    source: Path | None = None

    @classmethod
    def load(cls, path: Path) -> UpdateConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text("utf-8"))["update"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: [update] unreadable: {exc}") from exc
        known = {"root", "repository", "ca_file", "trusted_root", "python",
                 "health_deadline_s", "max_trial_boots", "shared_site"}
        problems = [f"{path}: update.{k}: unknown key" for k in raw if k not in known]
        problems += [f"{path}: update.{k}: required" for k in
                     ("root", "repository", "ca_file", "trusted_root") if k not in raw]
        if problems:
            raise ConfigError(problems[0], problems)
        if not str(raw["repository"]).startswith("https://"):
            raise ConfigError(f"{path}: update.repository: an https:// URL is required")
        deadline = int(raw.get("health_deadline_s", DEFAULT_DEADLINE_S))
        if not 30 <= deadline <= 3600:
            raise ConfigError(f"{path}: update.health_deadline_s: 30..3600")
        return cls(root=Path(raw["root"]), repository=str(raw["repository"]),
                   ca_file=Path(raw["ca_file"]), trusted_root=Path(raw["trusted_root"]),
                   python=str(raw.get("python", "/usr/bin/python3")),
                   health_deadline_s=deadline,
                   max_trial_boots=int(raw.get("max_trial_boots", DEFAULT_MAX_TRIAL_BOOTS)),
                   shared_site=Path(raw["shared_site"]) if raw.get("shared_site") else None,
                   source=path)


class UpdateMachine:
    def __init__(self, cfg: UpdateConfig) -> None:
        self.cfg = cfg
        self.slots = Slots(cfg.root)

    def state(self) -> dict[str, Any]:
        return self.slots.read_state()

    def request(self, target: str, *, version: str | None = None, nonce: str | None = None,
                deadline_s: int | None = None) -> dict[str, Any]:
        """Record an update request (the agent already checked it may update now)."""
        st = self.state()
        if st["state"] in IN_PROGRESS:
            if st.get("target") == target:
                return st                   # the same request again: carry on
            raise UpdateRefused("busy", f"update to {st.get('target')} is {st['state']}")
        active = self.slots.active()
        if active is None:
            raise UpdateRefused("bad_slot", f"{self.cfg.root}/current is not a slot link")
        if version is not None and self.slots.version(active) == version:
            raise UpdateRefused("already_installed", f"slot {active} runs {version}")
        return self.slots.write_state({
            "state": "preparing", "target": target, "version": version, "nonce": nonce,
            "from_slot": active, "to_slot": Slots.other(active), "reason": None,
            "deadline_s": int(deadline_s or self.cfg.health_deadline_s),
            "max_boots": self.cfg.max_trial_boots, "boots": 0, "deadline_ms": None,
            "committed_slot": st.get("committed_slot", active)})

    def prepare(self) -> dict[str, Any]:
        """Download, verify and install the requested target into the other slot."""
        st = self.state()
        if st["state"] != "preparing":
            return st
        crash_point("update.prepare_begin")
        # python-tuf and urllib3 are loaded here, in the child process, never by the agent.
        from edge.update.fetch import ReleaseSource

        src = ReleaseSource(self.cfg.root, self.cfg.repository, self.cfg.ca_file,
                            self.cfg.trusted_root)
        from edge.update.bundle import install

        try:
            rel = src.fetch(st["target"], on_chunk=lambda _n: crash_point("update.download_chunk"))
            if st.get("version") is not None and rel.version != st["version"]:
                raise UpdateRefused("wrong_version", f"{rel.name} is version {rel.version}, "
                                                     f"the command asked for {st['version']}")
            marker = self.slots.marker(st["to_slot"])
            if marker is None or marker.get("sha256") != rel.sha256:
                marker = install(self.slots, st["to_slot"], rel.path, rel.sha256,
                                 python=self.cfg.python, shared_site=self.cfg.shared_site)
        except UpdateRefused as exc:
            if exc.code == "unreachable":
                # The hall network or the repository is down: the request stays, the
                # next attempt resumes the download where it stopped.
                return self.slots.write_state({**st, "reason": str(exc)[:256]})
            log.warning("update refused: %s", exc)
            return self.slots.write_state({**st, "state": "failed", "code": exc.code,
                                           "reason": str(exc)[:256]})
        return self.slots.write_state({**st, "state": "installed", "version": marker["version"],
                                       "sha256": rel.sha256, "reason": None})

    def switch(self) -> dict[str, Any]:
        """installed -> switching -> current renamed -> trial. Call only when idle."""
        st = self.state()
        if st["state"] != "installed":
            return st
        deadline = now_ms() + int(st.get("deadline_s", self.cfg.health_deadline_s)) * 1000
        st = self.slots.write_state({**st, "state": "switching", "deadline_ms": deadline,
                                     "boots": 0})
        crash_point("update.switch_begin")
        self.slots.switch(st["to_slot"])
        crash_point("update.switched")
        st = self.slots.write_state({**st, "state": "trial"})
        crash_point("update.trial")
        return st

    def commit(self, running_slot: str | None) -> dict[str, Any]:
        """trial -> committed, by the trial slot's own agent once its health check passed."""
        st = self.state()
        if st["state"] != "trial" or running_slot != st.get("to_slot") \
                or self.slots.active() != running_slot:
            return st
        crash_point("update.commit_begin")
        st = self.slots.write_state({**st, "state": "committed", "deadline_ms": None,
                                     "committed_slot": running_slot, "reason": None})
        crash_point("update.committed")
        return st

    def rollback(self, reason: str) -> dict[str, Any]:
        st = self.state()
        if st["state"] not in ("trial", "switching"):
            return st
        return self.slots.rollback(st, reason)


def running_slot(root: Path) -> str | None:
    """Which slot this interpreter runs from (its venv is root/slots/x), else None."""
    prefix = Path(sys.prefix).resolve()
    for s in SLOTS:
        try:
            if prefix == (Path(root) / "slots" / s).resolve():
                return s
        except OSError:
            continue
    return None


__all__ = ["IN_PROGRESS", "UpdateConfig", "UpdateMachine", "running_slot"]
