"""Payload schemas of contract version 1: a tiny declarative validator, no third-party deps.

Each message type has a schema of fields (name, type, required, constraints). Validation is
strict: unknown fields are rejected, every string is bounded, and there are NO floats
anywhere (a float prints differently in every language, so it cannot be part of canonical
signed JSON): quantities are integers in the unit their name states (``temp_mC``,
``uptime_s``, ``issued_at_ms``).

Every problem found is reported with its path (``ticket.body.waiting_ahead: expected int
>= 0``), all of them in one ContractError, ESPHome style. Messages name fields and rules,
never the offending value: a body may carry personal data.

String lengths count Unicode code points.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from hallkiosk.errors import ContractError

from .topics import ID_RE

CONTRACT_VERSION: Final = 1
#: Upper bound of a whole MQTT payload (the signed envelope), in bytes.
MAX_PAYLOAD: Final = 16 * 1024
#: Default upper bound of a string, in code points.
MAX_STR: Final = 256
#: Integers stay exactly representable as IEEE-754 doubles (JavaScript, Lua, jq).
MAX_SAFE_INT: Final = 2**53 - 1

#: Keys of telemetry objects (they become metric names on the hall side). Upper case is
#: allowed only because units need it: ``temp_mC`` (milli-Celsius) is not ``temp_mc``.
TELEMETRY_KEY_RE: Final = re.compile(r"[A-Za-z0-9_]{1,64}")
#: Keys of free-form objects (event detail, state extra, cmd args, cmd_result detail).
FREE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Free text may hold TAB and LF; every other C0 control, DEL and lone surrogates (which
# have no UTF-8 encoding) are refused so a payload always encodes and prints safely.
_BAD_TEXT_RE: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")

Problems = list[str]

#: Keys that matched a key pattern, remembered per pattern: the same few dozen telemetry keys
#: arrive in every message, and a set lookup is far cheaper than a regex. Bounded, so hostile
#: keys cannot grow it (beyond the bound every key is matched the slow way).
_KNOWN_KEYS: dict[re.Pattern[str], set[str]] = {}
_KNOWN_KEYS_MAX = 4096


def _key_matches(key_re: re.Pattern[str], key: object) -> bool:
    known = _KNOWN_KEYS.get(key_re)
    if known is None:
        known = _KNOWN_KEYS.setdefault(key_re, set())
    if key in known:
        return True
    if type(key) is not str or not key_re.fullmatch(key):
        return False
    if len(known) < _KNOWN_KEYS_MAX:
        known.add(key)
    return True


class Spec:
    """A value type. ``check`` appends problems and returns the (rebuilt) value."""

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        """Whether ``check`` would find no problem in ``value``: the same rules, without
        building paths and messages (the verify path of every message; a refusal then runs
        ``check`` for the words). Each subclass mirrors its own ``check``, and
        tests/test_envelope.py proves the two agree on generated values."""
        problems: Problems = []
        self.check(value, "", problems)
        return not problems

    def compiled(self) -> Callable[[Any], bool]:
        """``accepts`` as one generated Python function (see _Compiler): the same rules with
        the per-value method calls inlined. What validate_body runs; the tests prove it
        agrees with ``accepts`` and ``check`` on generated values."""
        fn = self.__dict__.get("_compiled")
        if fn is None:
            fn = _Compiler().function(self)
            object.__setattr__(self, "_compiled", fn)
        return fn

    def _expr(self, var: str, c: _Compiler) -> str:
        """A Python expression, true when the value bound to the local ``var`` passes
        (every spec of v1 has one; the fallback calls ``accepts``)."""
        return f"{c.const(self.accepts)}({var})"

    def _fail(self, path: str, problems: Problems) -> None:
        problems.append(f"{path}: expected {self.describe()}")

    def types(self) -> tuple[type, ...] | None:
        """The Python types a value must have to pass (None: not known). AnyOf skips an
        option whose types exclude the value instead of building its error message."""
        return None


@dataclass(frozen=True)
class Int(Spec):
    min: int = -MAX_SAFE_INT
    max: int = MAX_SAFE_INT

    def describe(self) -> str:
        lo, hi = self.min != -MAX_SAFE_INT, self.max != MAX_SAFE_INT
        if lo and hi:
            return f"int in [{self.min}, {self.max}]"
        if lo:
            return f"int >= {self.min}"
        if hi:
            return f"int <= {self.max}"
        return "int"

    def types(self) -> tuple[type, ...]:
        return (int,)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        if type(value) is float:
            problems.append(f"{path}: expected {self.describe()} (floats are not allowed)")
        # bool is a subclass of int in Python; in JSON they are different types.
        elif type(value) is not int or not self.min <= value <= self.max:
            self._fail(path, problems)
        return value

    def accepts(self, value: Any) -> bool:
        return type(value) is int and self.min <= value <= self.max

    def _expr(self, var: str, c: _Compiler) -> str:
        return f"(type({var}) is int and {int(self.min)} <= {var} <= {int(self.max)})"


@dataclass(frozen=True)
class Bool(Spec):
    def describe(self) -> str:
        return "bool"

    def types(self) -> tuple[type, ...]:
        return (bool,)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        if type(value) is not bool:
            self._fail(path, problems)
        return value

    def accepts(self, value: Any) -> bool:
        return type(value) is bool

    def _expr(self, var: str, c: _Compiler) -> str:
        return f"(type({var}) is bool)"


@dataclass(frozen=True)
class Str(Spec):
    """A string: free text by default, or a ``pattern`` (full match), or one of ``enum``."""

    max_len: int = MAX_STR
    min_len: int = 0
    pattern: re.Pattern[str] | None = None
    enum: tuple[str, ...] | None = None
    label: str | None = None

    def describe(self) -> str:
        if self.enum is not None:
            return " | ".join(f'"{e}"' for e in self.enum)
        if self.label is not None:
            return self.label
        if self.min_len:
            return f"str of {self.min_len}-{self.max_len} chars"
        return f"str of at most {self.max_len} chars"

    def types(self) -> tuple[type, ...]:
        return (str,)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        if type(value) is not str:
            self._fail(path, problems)
        elif self.enum is not None:
            if value not in self.enum:
                self._fail(path, problems)
        elif not self.min_len <= len(value) <= self.max_len:
            self._fail(path, problems)
        elif self.pattern is not None:
            if not self.pattern.fullmatch(value):
                self._fail(path, problems)
        elif _BAD_TEXT_RE.search(value):
            problems.append(f"{path}: control character or lone surrogate in text")
        return value

    def accepts(self, value: Any) -> bool:
        if type(value) is not str:
            return False
        if self.enum is not None:
            return value in self.enum
        if not self.min_len <= len(value) <= self.max_len:
            return False
        if self.pattern is not None:
            return self.pattern.fullmatch(value) is not None
        return _BAD_TEXT_RE.search(value) is None

    def _expr(self, var: str, c: _Compiler) -> str:
        if self.enum is not None:
            return f"(type({var}) is str and {var} in {c.const(frozenset(self.enum))})"
        size = f"{int(self.min_len)} <= len({var}) <= {int(self.max_len)}"
        if self.pattern is not None:
            rule = f"{c.const(self.pattern.fullmatch)}({var}) is not None"
        else:
            rule = f"{c.const(_BAD_TEXT_RE.search)}({var}) is None"
        return f"(type({var}) is str and {size} and {rule})"


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def describe(self) -> str:
        return f"{self.inner.describe()} | null"

    def types(self) -> tuple[type, ...] | None:
        inner = self.inner.types()
        return None if inner is None else inner + (type(None),)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        if value is None:
            return None
        mark = len(problems)
        out = self.inner.check(value, path, problems)
        if len(problems) == mark + 1 and problems[mark].startswith(f"{path}: expected "):
            # Re-word so the reader learns null was also acceptable.
            problems[mark] = f"{path}: expected {self.describe()}"
        return out

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def _expr(self, var: str, c: _Compiler) -> str:
        return f"({var} is None or {self.inner._expr(var, c)})"


@dataclass(frozen=True)
class Scalar(Spec):
    """int | bool | str | null (strings as free text of at most ``max_len``)."""

    max_len: int = MAX_STR

    def __post_init__(self) -> None:
        object.__setattr__(self, "_text", Str(self.max_len))   # built once, not per value

    def describe(self) -> str:
        return f"int | bool | str (<= {self.max_len} chars) | null"

    def types(self) -> tuple[type, ...]:
        return (type(None), bool, int, str)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        if value is None or type(value) is bool:
            return value
        if type(value) is int:
            if abs(value) > MAX_SAFE_INT:
                problems.append(f"{path}: int outside +-(2**53-1)")
            return value
        if type(value) is str:
            return self._text.check(value, path, problems)  # type: ignore[attr-defined]
        if type(value) is float:
            problems.append(f"{path}: float not allowed (use an int in a named unit)")
            return value
        self._fail(path, problems)
        return value

    def accepts(self, value: Any) -> bool:
        kind = type(value)
        if value is None or kind is bool:
            return True
        if kind is int:
            return abs(value) <= MAX_SAFE_INT
        return kind is str and self._text.accepts(value)  # type: ignore[attr-defined]

    def _expr(self, var: str, c: _Compiler) -> str:
        text = self._text._expr(var, c)  # type: ignore[attr-defined]
        return (f"({var} is None or type({var}) is bool or (type({var}) is int and "
                f"-{MAX_SAFE_INT} <= {var} <= {MAX_SAFE_INT}) or {text})")


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    max_items: int = 64
    unique: bool = False

    def describe(self) -> str:
        unique = "unique " if self.unique else ""
        return f"list of at most {self.max_items} {unique}({self.item.describe()})"

    def types(self) -> tuple[type, ...]:
        return (list, tuple)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        # Tuples are accepted from Python callers (frozen config); JSON only yields lists.
        if type(value) not in (list, tuple) or len(value) > self.max_items:
            self._fail(path, problems)
            return value
        out = [self.item.check(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        if self.unique and len({repr(v) for v in out}) != len(out):
            problems.append(f"{path}: duplicate items")
        return out

    def accepts(self, value: Any) -> bool:
        if type(value) not in (list, tuple) or len(value) > self.max_items:
            return False
        accepts = self.item.accepts
        for v in value:
            if not accepts(v):
                return False
        # check() compares the rebuilt items; an accepted item rebuilds to an equal value,
        # and its repr differs only for a Struct item (key order), which no unique list holds.
        return not self.unique or len({repr(v) for v in value}) == len(value)

    def _expr(self, var: str, c: _Compiler) -> str:
        item = self.item._expr("x", c)
        unique = "len({repr(x) for x in value}) == len(value)" if self.unique else "True"
        return c.helper(var, f"""\
    if (type(value) is not list and type(value) is not tuple) or len(value) > {int(self.max_items)}:
        return False
    for x in value:
        if not {item}:
            return False
    return {unique}""")


@dataclass(frozen=True)
class MapOf(Spec):
    """An object with free keys matching ``key_re`` and values of one spec."""

    key_re: re.Pattern[str]
    value: Spec
    max_items: int = 32

    def describe(self) -> str:
        return (f"object of at most {self.max_items} keys [{self.key_re.pattern}] -> "
                f"({self.value.describe()})")

    def types(self) -> tuple[type, ...]:
        return (dict,)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        if type(value) is not dict or len(value) > self.max_items:
            self._fail(path, problems)
            return value
        out = {}
        for key, item in value.items():
            if not _key_matches(self.key_re, key):
                problems.append(f"{path}: key {_shown_key(key)} does not match "
                                f"[{self.key_re.pattern}]")
                continue
            out[key] = self.value.check(item, f"{path}.{key}", problems)
        return out

    def accepts(self, value: Any) -> bool:
        if type(value) is not dict or len(value) > self.max_items:
            return False
        key_re, accepts = self.key_re, self.value.accepts
        for k, v in value.items():
            if not (_key_matches(key_re, k) and accepts(v)):
                return False
        return True

    def _expr(self, var: str, c: _Compiler) -> str:
        return c.helper(var, f"""\
    if type(value) is not dict or len(value) > {int(self.max_items)}:
        return False
    for k, x in value.items():
        if not ({c.key_test("k", self.key_re)} and {self.value._expr("x", c)}):
            return False
    return True""")


@dataclass(frozen=True)
class AnyOf(Spec):
    """The first alternative that accepts the value wins."""

    options: tuple[Spec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_option_types", tuple(o.types() for o in self.options))
        object.__setattr__(self, "_options_typed", tuple(zip(self.options, self._option_types)))

    def describe(self) -> str:
        return " | ".join(f"({o.describe()})" for o in self.options)

    def types(self) -> tuple[type, ...] | None:
        union: tuple[type, ...] = ()
        for t in self._option_types:  # type: ignore[attr-defined]
            if t is None:
                return None
            union += t
        return union

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        kind = type(value)
        for option, types in zip(self.options, self._option_types):  # type: ignore[attr-defined]
            if types is not None and kind not in types:
                continue                 # it would fail: skip building its message
            trial: Problems = []
            out = option.check(value, path, trial)
            if not trial:
                return out
        if type(value) is float:
            problems.append(f"{path}: float not allowed (use an int in a named unit)")
        else:
            self._fail(path, problems)
        return value

    def accepts(self, value: Any) -> bool:
        kind = type(value)
        for option, types in self._options_typed:  # type: ignore[attr-defined]
            if (types is None or kind in types) and option.accepts(value):
                return True
        return False

    def _expr(self, var: str, c: _Compiler) -> str:
        # Each option's expression starts with its own type test: the skip of accepts().
        return "(" + " or ".join(o._expr(var, c) for o in self.options) + ")"


@dataclass(frozen=True)
class Field:
    name: str
    spec: Spec
    required: bool = True


@dataclass(frozen=True)
class Struct(Spec):
    """An object with named fields. Unknown keys are rejected unless ``extra`` is given.

    ``extra`` validates any other key matching ``extra_key_re`` (telemetry's free keys);
    ``cross`` checks relations between fields once each field passed on its own.
    """

    fields: tuple[Field, ...]
    extra: Spec | None = None
    extra_key_re: re.Pattern[str] | None = None
    max_extra: int = 64
    cross: Callable[[dict[str, Any], str, Problems], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_known", frozenset(f.name for f in self.fields))

    def describe(self) -> str:
        return "object"

    def types(self) -> tuple[type, ...]:
        return (dict,)

    def check(self, value: Any, path: str, problems: Problems) -> Any:
        if type(value) is not dict:
            self._fail(path, problems)
            return value
        mark = len(problems)
        known = self._known  # type: ignore[attr-defined]
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.name in value:
                out[f.name] = f.spec.check(value[f.name], f"{path}.{f.name}", problems)
            elif f.required:
                problems.append(f"{path}.{f.name}: required field missing")
        extras = [k for k in value if k not in known]
        if self.extra is None:
            for key in extras:
                hint = ""
                if type(key) is str:
                    close = difflib.get_close_matches(key, [f.name for f in self.fields], n=1)
                    if close:
                        hint = f" (did you mean {close[0]!r}?)"
                problems.append(f"{path}: unknown field {_shown_key(key)}{hint}")
        else:
            if len(extras) > self.max_extra:
                problems.append(f"{path}: more than {self.max_extra} fields")
            key_re = self.extra_key_re or FREE_KEY_RE
            for key in extras:
                if not _key_matches(key_re, key):
                    problems.append(f"{path}: key {_shown_key(key)} does not match "
                                    f"[{key_re.pattern}]")
                    continue
                out[key] = self.extra.check(value[key], f"{path}.{key}", problems)
        if self.cross is not None and len(problems) == mark:
            self.cross(out, path, problems)
        return out

    def accepts(self, value: Any) -> bool:
        if type(value) is not dict:
            return False
        for f in self.fields:
            if f.name in value:
                if not f.spec.accepts(value[f.name]):
                    return False
            elif f.required:
                return False
        known = self._known  # type: ignore[attr-defined]
        extras = [k for k in value if k not in known]
        if extras:
            if self.extra is None or len(extras) > self.max_extra:
                return False
            key_re = self.extra_key_re or FREE_KEY_RE
            accepts = self.extra.accepts
            for k in extras:
                if not (_key_matches(key_re, k) and accepts(value[k])):
                    return False
        if self.cross is not None:
            problems: Problems = []
            self.cross(value, "", problems)
            return not problems
        return True

    def _expr(self, var: str, c: _Compiler) -> str:
        lines = ["    if type(value) is not dict:", "        return False", "    present = 0"]
        for f in self.fields:
            lines += [f"    x = value.get({f.name!r}, MISSING)",
                      "    if x is MISSING:" if f.required else "    if x is not MISSING:"]
            if f.required:
                lines += ["        return False"]
            else:
                lines += ["        present += 1"]
            lines += [f"    {'if' if f.required else '    if'} not {f.spec._expr('x', c)}:",
                      f"    {'' if f.required else '    '}    return False"]
            if f.required:
                lines += ["    present += 1"]
        lines += ["    if len(value) != present:"]
        if self.extra is None:
            lines += ["        return False"]
        else:
            known = c.const(self._known)  # type: ignore[attr-defined]
            key_test = c.key_test("k", self.extra_key_re or FREE_KEY_RE)
            lines += [f"        if len(value) - present > {int(self.max_extra)}:",
                      "            return False",
                      "        for k, x in value.items():",
                      f"            if k not in {known} and not ({key_test} and "
                      f"{self.extra._expr('x', c)}):",
                      "                return False"]
        if self.cross is not None:
            lines += ["    problems = []", f"    {c.const(self.cross)}(value, '', problems)",
                      "    return not problems"]
        else:
            lines += ["    return True"]
        return c.helper(var, "\n".join(lines))


class _Compiler:
    """Turns a spec into one Python function: Int, Bool, Str, Nullable, Scalar and AnyOf
    become inline expressions, each Struct, ListOf and MapOf a small function of its own.
    Only names, integers (through int()) and the schemas' own field names (through repr())
    are written into the source; every other constant (patterns, enums, the cross-field
    rules) is passed in the namespace, so nothing from a message reaches the code.
    Why: a telemetry body has some 30 free keys, and a method call per key and per value
    was most of the schema's cost on the monitor's verify path (`make bench`, ops part)."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"MISSING": _MISSING, "km": _key_matches}
        self.sources: list[str] = []
        self._names: dict[int, str] = {}

    def const(self, value: Any) -> str:
        name = self._names.get(id(value))
        if name is None:
            name = self._names[id(value)] = f"c{len(self._names)}"
            self.namespace[name] = value
        return name

    def key_test(self, var: str, key_re: re.Pattern[str]) -> str:
        """_key_matches inlined: a set lookup for keys seen before (the same set object)."""
        known = _KNOWN_KEYS.setdefault(key_re, set())
        return f"({var} in {self.const(known)} or km({self.const(key_re)}, {var}))"

    def helper(self, var: str, body: str) -> str:
        name = f"f{len(self.sources)}"
        self.sources.append(f"def {name}(value):\n{body}\n")
        return f"{name}({var})"

    def function(self, spec: Spec) -> Callable[[Any], bool]:
        top = spec._expr("value", self)
        self.sources.append(f"def accepts(value):\n    return {top}\n")
        exec(compile("\n".join(self.sources), f"<schema {spec.describe()}>", "exec"),
             self.namespace)
        if re.fullmatch(r"f[0-9]+\(value\)", top):       # a container: its own function
            return self.namespace[top.partition("(")[0]]
        return self.namespace["accepts"]


_MISSING: Final = object()


def _shown_key(key: object) -> str:
    # Keys come off the wire: show them bounded and ASCII-escaped.
    text = ascii(key)
    return text if len(text) <= 40 else text[:37] + "..."


# -- the building blocks of v1 --------------------------------------------------------
ID = Str(max_len=32, min_len=1, pattern=ID_RE,
         label="id (1-32 of A-Z a-z 0-9 _ -, not starting with -)")
TICKET_UID_RE: Final = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_-]{0,31}):([1-9][0-9]{0,15})")
TICKET_UID = Str(max_len=49, min_len=3, pattern=TICKET_UID_RE, label='"{device}:{serial}"')
HEX64 = Str(64, 64, re.compile(r"[0-9a-f]{64}"), label="64 lowercase hex chars")
NONCE = Str(64, 16, re.compile(r"[A-Za-z0-9_-]{16,64}"), label="nonce of 16-64 of A-Z a-z 0-9 _ -")
NAME = Str(64, 1, re.compile(r"[a-z0-9_.]{1,64}"), label="name of 1-64 of a-z 0-9 _ .")
SUBJECT = Str(64, 1, re.compile(r"[A-Za-z0-9_.-]{1,64}"), label="1-64 of A-Z a-z 0-9 _ . -")
VERSION = Str(64, 1, re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}"),
              label="version of 1-64 of A-Z a-z 0-9 . + _ -")
TEXT = Str(MAX_STR)
NON_NEG = Int(min=0)
POSITIVE = Int(min=1)
FLAT_OBJECT = MapOf(FREE_KEY_RE, Scalar(), 32)
# cmd args / cmd_result detail: scalars, lists of scalars, or one nested flat object.
OPEN_OBJECT = MapOf(FREE_KEY_RE, AnyOf((Scalar(), ListOf(Scalar(), 64), FLAT_OBJECT)), 32)
TELEMETRY_VALUE = AnyOf((Scalar(), MapOf(TELEMETRY_KEY_RE, Scalar(), 32)))


def _ticket_uid_matches_serial(body: dict[str, Any], path: str, problems: Problems) -> None:
    match = TICKET_UID_RE.fullmatch(body["ticket_uid"])
    if match is not None and int(match.group(2)) != body["serial"]:
        problems.append(f"{path}.ticket_uid: serial part differs from {path}.serial")


def _cmd_result_names_its_command(body: dict[str, Any], path: str, problems: Problems) -> None:
    # A refusal of what cannot be attributed to a new command (unauthenticated, replayed,
    # malformed) names none: ops must never read a second answer for a command they sent.
    unnamed = (body["cmd_seq"] is None, body["nonce"] is None)
    if unnamed[0] != unnamed[1]:
        problems.append(f"{path}.cmd_seq, {path}.nonce: both null or neither")
    elif unnamed[0] and body["status"] != "refused":
        problems.append(f"{path}.cmd_seq: null only in a refusal")


#: What an ops-monitor alert can be about (ops.alerts evaluates them; see docs/mqtt-contract.md).
ALERT_KINDS: Final = ("offline", "paper", "temperature", "outbox_backlog", "fault",
                      "gaps", "bad_signature", "replay", "malformed")
ALERT_SEVERITIES: Final = ("info", "warning", "critical")
#: "{rule}:{hall}:{device}:{episode start, unix s}": equal on every monitor that sees the episode.
ALERT_ID = Str(128, 1, re.compile(r"[A-Za-z0-9_][A-Za-z0-9_:-]{0,127}"),
               label="alert id of 1-128 of A-Z a-z 0-9 _ : -")


SCHEMAS: Final[Mapping[str, Struct]] = {
    "ticket": Struct((
        Field("ticket_uid", TICKET_UID),
        Field("ticket_id", Str(32, 1)),
        Field("service", ID),
        Field("service_name", Str(128, 1)),
        Field("number", POSITIVE),
        Field("serial", POSITIVE),
        Field("issued_at_ms", NON_NEG),
        Field("clock_trusted", Bool()),
        Field("waiting_ahead", NON_NEG),
        Field("priority", Str(enum=("normal", "appointment"))),
        Field("appointment_id", Nullable(Str(64, 1))),
        Field("citizen", Nullable(HEX64)),
        Field("source", Str(enum=("idcard", "qr", "button"))),
        Field("printed", Str(enum=("yes", "no", "unknown"))),
    ), cross=_ticket_uid_matches_serial),
    "ticket_ack": Struct((
        Field("ticket_uid", TICKET_UID),
        Field("ticket_id", Str(32, 1)),
        Field("status", Str(enum=("accepted", "duplicate"))),
        Field("ledger_id", POSITIVE),
    )),
    "state": Struct((
        Field("status", Str(enum=("online", "offline", "degraded", "out_of_service"))),
        Field("session", NON_NEG),
        Field("agent_version", VERSION),
        Field("since_ms", NON_NEG),
        Field("reason", Nullable(TEXT)),
        Field("services", ListOf(ID, 64, unique=True)),
        Field("extra", FLAT_OBJECT, required=False),
    )),
    "telemetry": Struct((
        Field("uptime_s", NON_NEG),
    ), extra=TELEMETRY_VALUE, extra_key_re=TELEMETRY_KEY_RE, max_extra=63),
    "event": Struct((
        Field("name", NAME),
        Field("severity", Str(enum=("info", "warning", "fault"))),
        Field("subject", Nullable(SUBJECT)),
        Field("detail", FLAT_OBJECT),
    )),
    "cmd": Struct((
        Field("name", NAME),
        Field("args", OPEN_OBJECT),
        Field("target", ID),
        Field("nonce", NONCE),
        Field("expires_at_ms", NON_NEG),
    )),
    "cmd_result": Struct((
        Field("cmd_seq", Nullable(POSITIVE)),
        Field("nonce", Nullable(NONCE)),
        Field("status", Str(enum=("accepted", "refused", "done", "failed"))),
        Field("reason", Nullable(TEXT)),
        Field("detail", OPEN_OBJECT),
    ), cross=_cmd_result_names_its_command),
    "alert": Struct((
        Field("alert_id", ALERT_ID),
        Field("rule", ID),
        Field("kind", Str(enum=ALERT_KINDS)),
        Field("severity", Str(enum=ALERT_SEVERITIES)),
        Field("state", Str(enum=("firing", "resolved"))),
        Field("device", ID),
        Field("value", Nullable(Int())),
        Field("since_ms", NON_NEG),
        Field("message", TEXT),
    )),
}

#: Every message type of contract v1.
MESSAGE_TYPES: Final = tuple(SCHEMAS)


def validate_body(msg_type: str, body: Any, *, owned: bool = False) -> dict[str, Any]:
    """Validate ``body`` against the v1 schema of ``msg_type``; return a rebuilt copy, or
    with ``owned`` (the caller just parsed it and nobody else holds it) ``body`` itself
    when it passes.

    Raises ContractError listing every problem with its path, e.g.
    ``ticket.body.waiting_ahead: expected int >= 0``.
    """
    schema = SCHEMAS.get(msg_type) if isinstance(msg_type, str) else None
    if schema is None:
        raise ContractError(f"unknown message type {_shown_key(msg_type)}; expected one of "
                            + ", ".join(MESSAGE_TYPES))
    if owned and schema.compiled()(body):
        return body
    problems: Problems = []
    out = schema.check(body, f"{msg_type}.body", problems)
    if problems:
        raise ContractError("; ".join(problems))
    return out
