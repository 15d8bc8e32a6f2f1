"""One exception root for the whole project.

Leaves also inherit the builtin they resemble (as gpiozero's ``PinInvalidPull(PinError,
ValueError)`` does), so callers that only know the builtin still catch them. Messages name
the device and the port, the file and the key path: whoever reads the log must be able to
act on it without the source.
"""

from __future__ import annotations


class HallkioskError(Exception):
    """Root of every error hallkiosk raises on purpose."""


# -- configuration -------------------------------------------------------------------
class ConfigError(HallkioskError, ValueError):
    """A config or board file is missing, unreadable or invalid.

    ``problems`` lists every problem found (validation collects them all, ESPHome style),
    each already formatted as ``file: key.path: message``.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [message])


# -- wire protocols (pure code) --------------------------------------------------------
class ProtocolError(HallkioskError, ValueError):
    """Bytes that do not form a valid frame of the protocol."""


class ChecksumError(ProtocolError):
    """A frame whose checksum or CRC does not match its content."""


class FrameTooLong(ProtocolError):
    """A frame longer than the protocol allows (never buffered without bound)."""


# -- devices ---------------------------------------------------------------------------
class DeviceError(HallkioskError, OSError):
    """A peripheral misbehaved or went away. The message names the device and its port."""


class DeviceTimeout(DeviceError, TimeoutError):
    """A peripheral did not answer in time. Silence is a fault, never 'all fine'."""


class DeviceGone(DeviceError, ConnectionError):
    """A peripheral's transport vanished (USB unplug, EIO, closed pty)."""


class DeviceRefused(DeviceError):
    """A peripheral answered with an error status (e.g. a GA 467 SW3 failure code)."""


# -- the citizen's card ----------------------------------------------------------------
class CardError(HallkioskError, ValueError):
    """Card data that cannot identify a citizen (bad check digit, expired, unreadable)."""


# -- the MQTT contract -----------------------------------------------------------------
class ContractError(HallkioskError, ValueError):
    """A message that does not follow the MQTT contract (topic, schema, envelope)."""


class SignatureError(ContractError):
    """An envelope whose signature, key or bound topic does not verify."""


class RoleError(SignatureError):
    """An authentic envelope whose key lacks the role its topic's kind requires (step 9)."""


class ReplayError(ContractError):
    """An envelope already seen (same device and sequence number, or older)."""


# -- durable state ---------------------------------------------------------------------
class StateError(HallkioskError, RuntimeError):
    """The kiosk's durable state (outbox, counters) is unusable."""
