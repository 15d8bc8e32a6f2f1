"""Agent config: the documented example loads; every kind of mistake is reported with the
file and key path, all at once; the result is frozen."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tomllib
from datetime import date
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import (AgentConfig, ServiceConfig, config_digest, load_config,
                         parse_config)
from hallkiosk.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "agent.example.toml"


class Site:
    """A tmp dir with a real secret and device key (chmod 600) and a config writer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secret = root / "citizen.secret"
        self.secret.write_bytes(os.urandom(48))
        self.key = root / "device.key"
        self.key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        for path in (self.secret, self.key):
            path.chmod(0o600)
        self.text = (EXAMPLE.read_text()
                     .replace("/etc/hallkiosk/citizen.secret", str(self.secret))
                     .replace("/etc/hallkiosk/device.key", str(self.key))
                     .replace("/var/lib/hallkiosk", str(root / "state")))

    def write(self, *edits: tuple[str, str], name: str = "agent.toml") -> Path:
        text = self.text
        for old, new in edits:
            assert old in text, f"test edit does not apply: {old!r}"
            text = text.replace(old, new, 1)
        path = self.root / name
        path.write_text(text)
        return path

    def problems(self, *edits: tuple[str, str]) -> tuple[Path, list[str]]:
        path = self.write(*edits)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        return path, info.value.problems


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(tmp_path)


def one_problem(site: Site, *edits) -> str:
    path, problems = site.problems(*edits)
    assert len(problems) == 1, problems
    prefix = f"{path}: "
    assert problems[0].startswith(prefix)
    return problems[0][len(prefix):]


# -- the example -------------------------------------------------------------------------
def test_example_loads(site):
    path = site.write()
    cfg = load_config(path)
    assert isinstance(cfg, AgentConfig)
    assert cfg.source == path
    assert cfg.kiosk.device_id == "k07" and cfg.kiosk.number_prefix == "07"
    assert cfg.kiosk.state_dir == site.root / "state"
    assert cfg.board.model == "rpi4b" == cfg.kiosk.board
    assert cfg.hall.citizen_hash_secret_file == site.secret
    assert cfg.keys.device_key == site.key
    assert [(k.owner, k.role, len(k.public_key)) for k in cfg.keys.trusted] == [
        ("ledger", "consumer", 32), ("hall-ops", "ops", 32)]
    assert cfg.broker.client_id == "k07" and cfg.broker.port == 1883
    assert cfg.broker.reconnect_max_s == 30.0
    # The reader port is left out of the example: it comes from the board profile.
    assert cfg.reader.port == cfg.board.serial["idcard_reader"]
    assert cfg.printer.encoding == "cp437"
    assert [s.category for s in cfg.services] == ["A", "B", "C"]
    assert cfg.digest == hashlib.sha256(path.read_bytes()).hexdigest() == config_digest(cfg)


def test_example_uses_every_key_the_loader_knows(site):
    # So the documentation cannot fall behind the schema.
    data = tomllib.loads(site.text)
    from edge.config import _TOP
    # [tls] is shown commented out: its files come from a provisioning bundle.
    assert set(data) == set(_TOP) - {"tls"}
    assert "# [tls]" in site.text
    assert set(data["broker"]) == {"host", "port", "keepalive_s", "reconnect_min_s",
                                   "reconnect_max_s", "client_id"}
    assert set(data["kiosk"]) == {"device_id", "hall", "number_prefix", "board", "state_dir"}


def test_service_lookups(site):
    cfg = load_config(site.write())
    assert cfg.service_by_button("B") == ServiceConfig("B", "Residence permit", "B")
    assert cfg.service_by_button("D") is None  # on the board, no service configured
    assert cfg.service("C").name == "Certificates"
    with pytest.raises(KeyError):
        cfg.service("Z")


def test_result_is_frozen(site):
    cfg = load_config(site.write())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kiosk.device_id = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.reader = None
    with pytest.raises(TypeError):
        cfg.board.serial["printer"] = "/dev/null"
    assert isinstance(cfg.services, tuple) and isinstance(cfg.keys.trusted, tuple)
    assert not hasattr(cfg, "__dict__")  # slots: no stray attributes either


def test_defaults_and_relative_paths(tmp_path, monkeypatch):
    site = Site(tmp_path)
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[kiosk]
device_id = "k01"
hall = "h1"
number_prefix = "01"
board = "rpi5"
state_dir = "state"
[hall]
name = "Hall"
citizen_hash_secret_file = "{site.secret.name}"
[keys]
device_key = "./{site.key.name}"
[devices.reader]
port = "pty/reader"
[[services]]
category = "A"
name = "Card"
button = "A"
""")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.kiosk.state_dir == tmp_path / "state"
    assert cfg.hall.citizen_hash_secret_file.resolve() == site.secret
    assert cfg.keys.device_key.resolve() == site.key
    assert cfg.reader.port == str(tmp_path / "pty" / "reader")
    assert cfg.printer.port == cfg.board.serial["printer"]
    assert cfg.broker.client_id == "k01" and cfg.broker.keepalive_s == 30
    assert cfg.gpio.pin_factory == "default" and cfg.session.choose_timeout_s == 20.0
    assert cfg.keys.trusted == ()


def test_parse_config_without_a_file(site):
    data = tomllib.loads(site.text)
    cfg = parse_config(data, source="inline", base_dir=site.root)
    assert cfg.source == Path("inline") and len(cfg.digest) == 64
    with pytest.raises(ConfigError) as info:
        parse_config({**data, "gpio": {"pin_factory": "mok"}}, source="inline",
                     base_dir=site.root)
    assert info.value.problems == [
        "inline: gpio.pin_factory: unknown value 'mok', did you mean 'mock'? "
        "(one of: default, lgpio, rpigpio, pigpio, native, mock)"]


# -- file-level errors -------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: config file not found"]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_bad_toml_names_line_and_column(site):
    path = site.write(('[hall]\n', '[hall]\nname = "x" oops\n'))
    line = site.text.splitlines().index("[hall]") + 2
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: line {line}, column ")
    assert "invalid TOML" in problem


def test_not_utf8(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[kiosk]\nhall = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# -- one mistake each --------------------------------------------------------------------
def test_unknown_key_suggests(site):
    assert one_problem(site, ("poll_interval_s", "pol_interval_s")) == (
        "devices.reader.pol_interval_s: unknown key 'pol_interval_s', "
        "did you mean 'poll_interval_s'?")


def test_unknown_section_suggests(site):
    assert one_problem(site, ("[session]", "[sesion]")) == (
        "sesion: unknown key 'sesion', did you mean 'session'?")


def test_unknown_enum_value_suggests(site):
    assert one_problem(site, ('pin_factory = "default"', 'pin_factory = "lgpoi"')) == (
        "gpio.pin_factory: unknown value 'lgpoi', did you mean 'lgpio'? "
        "(one of: default, lgpio, rpigpio, pigpio, native, mock)")
    assert one_problem(site, ('role = "ops"', 'role = "opps"')).startswith(
        "keys.trusted[1].role: unknown value 'opps', did you mean 'ops'?")


def test_wrong_type_says_expected_and_found(site):
    assert one_problem(site, ("port = 1883", 'port = "1883"')) == (
        "broker.port: expected an integer, found a string ('1883')")
    assert one_problem(site, ("timeout_s = 1.0", "timeout_s = true")) == (
        "devices.reader.timeout_s: expected a number of seconds, found a boolean (true)")
    assert one_problem(site, ('number_prefix = "07"', "number_prefix = 7")) == (
        'kiosk.number_prefix: expected a string of 2 digits like "07", found an integer (7)')
    data = tomllib.loads(site.text)
    data["gpio"] = 3
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="t", base_dir=site.root)
    assert info.value.problems == ["t: gpio: expected a table, found an integer (3)"]


def test_missing_required_key_and_section(site):
    assert one_problem(site, ('device_id = "k07"\n', "")) == (
        "kiosk.device_id: required key missing")
    text_without_keys = ('device_key = "', 'device_kee = "')
    _, problems = site.problems(text_without_keys)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "keys.device_kee: unknown key 'device_kee', did you mean 'device_key'?",
        "keys.device_key: required key missing"]


def test_missing_required_section(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[kiosk]\ndevice_id = "k1"\nhall = "h"\nnumber_prefix = "01"\n'
                    'board = "rpi4b"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [
        "hall: required section missing", "hall.name: required key missing",
        "hall.citizen_hash_secret_file: required key missing",
        "keys: required section missing", "keys.device_key: required key missing",
        "services: required: at least one [[services]] entry"]


@pytest.mark.parametrize("edit, expect", [
    (("keepalive_s = 30", "keepalive_s = 2"),
     "broker.keepalive_s: must be between 5 and 3600, found 2"),
    (("port = 1883", "port = 70000"), "broker.port: must be between 1 and 65535, found 70000"),
    (("poll_interval_s = 0.3", "poll_interval_s = 0.01"),
     "devices.reader.poll_interval_s: must be between 0.05 and 5 s, found 0.01"),
    (("choose_timeout_s = 20", "choose_timeout_s = nan"),
     "session.choose_timeout_s: must be between 1 and 300 s, found nan"),
    (("window_s = 300", "window_s = 3601"),
     "commands.window_s: must be between 1 and 3600 s, found 3601"),
    (("window_s = 300", "window_s = 86400"),
     "commands.window_s: must be between 1 and 3600 s, found 86400"),
    (("reconnect_min_s = 0.5", "reconnect_min_s = 60"),
     "broker.reconnect_min_s: must not exceed reconnect_max_s (60 > 30)"),
    (('device_id = "k07"', 'device_id = "k/07"'),
     "kiosk.device_id: 'k/07' is not valid: 1-32 characters of A-Z a-z 0-9 _ -"),
    (('number_prefix = "07"', 'number_prefix = "7"'),
     "kiosk.number_prefix: '7' is not valid: exactly 2 digits, like \"07\""),
])
def test_out_of_range(site, edit, expect):
    assert one_problem(site, edit) == expect


def test_duplicate_category(site):
    assert one_problem(site, ('category = "B"', 'category = "A"')) == (
        "services[1].category: category 'A' already used by services[0]")


def test_duplicate_button(site):
    assert one_problem(site, ('button = "C"', 'button = "A"')) == (
        "services[2].button: button 'A' already used by services[0]")


def test_button_not_on_board(site):
    assert one_problem(site, ('button = "C"', 'button = "c"')) == (
        "services[2].button: board 'rpi4b' has no service button 'c', did you mean 'C'? "
        "(buttons: A, B, C, D)")
    # Button E exists on the CM4 carrier, not on the Pi 4 harness.
    cfg = load_config(site.write(('board = "rpi4b"', 'board = "cm4-kiosk"'),
                                 ('button = "C"', 'button = "E"')))
    assert cfg.service("C").button == "E"


def test_unknown_board_suggests(site):
    assert one_problem(site, ('board = "rpi4b"', 'board = "rpi4"')).startswith(
        "kiosk.board: unknown board 'rpi4', did you mean 'rpi4b'?")


def test_too_many_and_no_services(site):
    extra = "".join(f'\n[[services]]\ncategory = "X{i}"\nname = "n"\nbutton = "D"\n'
                    for i in range(6))
    _, problems = site.problems(("button = \"C\"\n", f'button = "C"\n{extra}'))
    assert any(p.endswith("services: expected 1 to 8 [[services]] entries, found 9")
               for p in problems)
    data = tomllib.loads(site.text)
    data["services"] = []
    with pytest.raises(ConfigError, match="found 0"):
        parse_config(data, source="x", base_dir=site.root)


def test_trusted_key_must_be_32_bytes_of_base64(site):
    assert one_problem(site, ('public_key = "2eDw', 'public_key = "AAAA2eDw')) == (
        "keys.trusted[0].public_key: decodes to 35 bytes, an Ed25519 public key is 32")
    assert one_problem(site, ('public_key = "2eDw', 'public_key = "*eDw')) == (
        "keys.trusted[0].public_key: not valid base64")


@pytest.mark.parametrize("name, ok", [("latin-1", "iso8859-1"), ("GB18030", "gb18030"),
                                      ("cp43", None), ("base64", None), ("undefined", None)])
def test_printer_encoding(site, name, ok):
    edit = ('encoding = "cp437"', f'encoding = "{name}"')
    if ok:
        assert load_config(site.write(edit)).printer.encoding == ok
    else:
        message = one_problem(site, edit)
        assert message.startswith(f"devices.printer.encoding: unknown text encoding '{name}'")
        if name == "cp43":
            assert "did you mean 'cp437'?" in message


def test_reader_and_printer_on_one_port(site):
    edits = (("timeout_s = 1.0", 'timeout_s = 1.0\nport = "/dev/ttyUSB0"'),
             ('port = "/dev/serial/by-id/usb-hallkiosk_printer-if00"',
              'port = "/dev/../dev/ttyUSB0"'))
    assert one_problem(site, *edits) == (
        "devices.printer.port: same port as devices.reader.port (/dev/../dev/ttyUSB0)")


def test_device_on_a_port_the_board_gives_to_another_role(site):
    edit = ("timeout_s = 1.0", 'timeout_s = 1.0\nport = "/dev/ttyAMA0"')
    assert one_problem(site, edit) == (
        "devices.reader.port: /dev/ttyAMA0 is the radar port of board 'rpi4b'")


def test_serial_role_with_no_port_anywhere(site, tmp_path, monkeypatch):
    # No shipped board lacks a printer, so resolve the name to a test profile that does.
    import boards
    import edge.config as config
    profile = tmp_path / "noprinter.toml"
    profile.write_text('model = "noprinter"\ndescription = "x"\n[gpio]\n'
                       'service_buttons = { A = 5, B = 6, C = 13 }\n'
                       'occupancy = { pir = 17, door = 27 }\n'
                       '[serial]\nidcard_reader = "/dev/ttyUSB0"\n')
    monkeypatch.setattr(config, "BOARD_NAMES", (*boards.BOARD_NAMES, "noprinter"))
    monkeypatch.setattr(config, "load_board", lambda name: boards.load_board_file(profile))
    _, problems = site.problems(('board = "rpi4b"', 'board = "noprinter"'),
                                ('port = "/dev/serial/by-id/usb-hallkiosk_printer-if00"\n', ""))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "devices.printer.port: not set, and board 'noprinter' has no 'printer' serial port "
        "to default to; set devices.printer.port"]


def test_pin_factory_the_board_cannot_use(site):
    edits = (('board = "rpi4b"', 'board = "rpi5"'),
             ('pin_factory = "default"', 'pin_factory = "rpigpio"'))
    assert one_problem(site, *edits) == (
        "gpio.pin_factory: 'rpigpio' cannot drive board 'rpi5' (use one of: lgpio)")
    ok = load_config(site.write(edits[0], ('pin_factory = "default"', 'pin_factory = "mock"')))
    assert ok.gpio.pin_factory == "mock"


# -- the secret and key files ------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_world_or_group_readable_secret(site, mode):
    site.secret.chmod(mode)
    message = one_problem(site)
    assert message == (f"hall.citizen_hash_secret_file: {site.secret} is accessible by "
                       f"group/others (mode {mode:04o}); run: chmod 600 {site.secret}")


def test_readable_device_key(site):
    site.key.chmod(0o640)
    assert one_problem(site).startswith(f"keys.device_key: {site.key} is accessible by")


def test_short_or_missing_secret(site):
    site.secret.write_bytes(b"x" * 31)
    assert one_problem(site) == (
        f"hall.citizen_hash_secret_file: {site.secret} holds 31 bytes, needs at least 32")
    site.secret.unlink()
    assert one_problem(site) == f"hall.citizen_hash_secret_file: file not found: {site.secret}"


def test_secret_path_is_a_directory(site):
    site.secret.unlink()
    site.secret.mkdir(mode=0o700)
    assert one_problem(site) == (
        f"hall.citizen_hash_secret_file: {site.secret} is not a regular file")


# -- all at once -------------------------------------------------------------------------
def test_many_problems_are_reported_together(site):
    site.secret.chmod(0o644)
    path, problems = site.problems(
        ("poll_interval_s", "pol_interval_s"),
        ("port = 1883", "port = 0"),
        ('pin_factory = "default"', 'pin_factory = "gpiod"'),
        ('category = "B"', 'category = "A"'),
        ('button = "C"', 'button = "G"'),
    )
    keys = [p[len(f"{path}: "):].split(": ")[0] for p in problems]
    assert sorted(keys) == sorted([
        "hall.citizen_hash_secret_file", "broker.port", "devices.reader.pol_interval_s",
        "gpio.pin_factory", "services[1].category", "services[2].button"])
    assert all(p.startswith(f"{path}: ") for p in problems)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: 6 problems:")
    assert all(p in str(info.value) for p in problems)


# -- fuzz: any document either loads or raises ConfigError with located problems ----------
toml_scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(),
                         st.text(max_size=12), st.dates())
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, prefix + (i,))


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("fuzz"))
    return site, tomllib.loads(site.text)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_mutation_loads_or_fails_cleanly(example_data, data):
    import copy
    site, base = example_data
    doc = copy.deepcopy(base)
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(toml_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or reshaped this path
    try:
        cfg = parse_config(doc, source="fuzz.toml", base_dir=site.root)
    except ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("fuzz.toml: ") for p in exc.problems)
    else:
        assert isinstance(cfg, AgentConfig)
        assert 1 <= len(cfg.services) <= 8
        assert all(isinstance(x, float) and math.isfinite(x)
                   for x in (cfg.broker.reconnect_min_s, cfg.session.choose_timeout_s))


@settings(max_examples=100, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["kiosk", "hall", "keys", "services", "x"]),
                           toml_values, max_size=5))
def test_any_document_shape_fails_cleanly(doc):
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="shape.toml", base_dir=Path("/nonexistent"))
    assert all(p.startswith("shape.toml: ") for p in info.value.problems)


def test_date_values_are_reported_as_such(site):
    data = tomllib.loads(site.text)
    data["broker"]["host"] = date(2025, 1, 1)
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="d", base_dir=site.root)
    assert info.value.problems == ["d: broker.host: expected a string, found a date"]
