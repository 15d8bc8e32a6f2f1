"""The update path's one error: a check failed, with a code ops can act on."""

from __future__ import annotations

from hallkiosk.errors import HallkioskError


class UpdateRefused(HallkioskError):
    """The repository, the bundle or the kiosk's situation refused an update; nothing was
    switched. ``code`` is one of docs/updates.md's refusal codes."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
