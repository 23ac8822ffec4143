"""The settings of `meshnode run`: one set of rules for the TOML file and the flags.

`--config FILE` (TOML) uses the flags' names without the dashes (``coap_port = 5683``,
``peer = ["10.0.0.2:5683"]``; ``peers`` and ``mdns = false`` are accepted too). Every
value is checked against `RULES` before anything starts, and a refusal names the key,
the value and what it must be: ``--config node.toml: log_level = 'verbose' is not
valid: it must be one of debug, info, warning, error``. A type that TOML allows but the
setting does not (``mdns = "no"``, ``peer = 5``, ``coap_port = 5683.0``) is refused the
same way, never reinterpreted.

The rules are plain predicates, one per setting (they were a JSON Schema checked with
`jsonschema`, which cost an idle node ~2.5 MB of imports for this one check at start-up).
They accept what that schema accepted, except three things it let through: a whole
number written as a float for an integer setting, NaN for a number, and a string that
matches its pattern only up to a trailing newline (``node_id = "bay-7\\n"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

Rule = Callable[[Any], bool]
"""Whether a setting's value is acceptable."""


def _integer(low: int, high: int | None = None) -> Rule:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v and (high is None or v <= high)


def _number(*, above: float, at_most: float = math.inf) -> Rule:
    """A number (int or float, not bool) in (above, at_most]; NaN never is."""
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and above < v <= at_most


def _text(*, pattern: str | None = None, max_length: int | None = None) -> Rule:
    """A non-empty string, matching `pattern` whole, of at most `max_length` characters."""
    compiled = re.compile(pattern) if pattern is not None else None
    return lambda v: (
        isinstance(v, str)
        and len(v) >= 1
        and (max_length is None or len(v) <= max_length)
        and (compiled is None or compiled.fullmatch(v) is not None)
    )


def _optional(rule: Rule) -> Rule:
    return lambda v: v is None or rule(v)


def _one_of(*choices: str) -> Rule:
    return lambda v: isinstance(v, str) and v in choices


def _boolean(v: Any) -> bool:
    return isinstance(v, bool)


def _list_of(rule: Rule) -> Rule:
    return lambda v: isinstance(v, list) and all(rule(item) for item in v)


_PORT = _integer(1, 65535)
_SECONDS = _number(above=0)
_KW = _number(above=0, at_most=4000)
_CONNECTOR = re.compile(r"[0-9]{1,4}")


def _connector_table(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and _CONNECTOR.fullmatch(k) is not None and _KW(kw) for k, kw in v.items()
    )


RULES: dict[str, Rule] = {
    "node_id": _optional(_text(pattern=r"[A-Za-z0-9._:-]{1,128}")),
    "data_dir": _text(),
    "bind": _text(),
    "coap_port": _PORT,
    "http_port": _PORT,
    "ocpp_port": _integer(0, 65535),
    "ocpp_certfile": _optional(_text()),
    "ocpp_keyfile": _optional(_text()),
    "peer": _list_of(_text()),
    "no_mdns": _boolean,
    "site": _text(max_length=128),
    "log_level": _one_of("debug", "info", "warning", "error"),
    "log_format": _one_of("text", "json"),
    "cloud_url": _optional(_text(pattern=r"https?://[^\s]+")),
    "retention": _SECONDS,
    "probe_interval": _SECONDS,
    "insecure": _boolean,
    "unknown_token_policy": _one_of("refuse", "accept_limited"),
    "unknown_token_max_wh": _optional(_integer(1)),
    "unknown_token_max_minutes": _optional(_integer(1)),
    "max_power_kw": _KW,
    "connector_max_power_kw": _connector_table,
}
"""Every setting of `meshnode run`, and what its value must satisfy (`WHAT` says it in words)."""

WHAT: dict[str, str] = {
    "node_id": "1 to 128 letters, digits or . _ : -",
    "data_dir": "a path to a directory (not empty)",
    "bind": "an address of this host (not empty)",
    "site": "a name of 1 to 128 characters",
    "coap_port": "a port number from 1 to 65535",
    "http_port": "a port number from 1 to 65535",
    "ocpp_port": "a port number from 1 to 65535, or 0 (no OCPP)",
    "ocpp_certfile": "a path to a PEM certificate",
    "ocpp_keyfile": "a path to a PEM key",
    "log_format": "text or json",
    "peer": 'a list of "HOST:PORT" strings',
    "no_mdns": "true or false",
    "mdns": "true or false",
    "log_level": "one of debug, info, warning, error",
    "cloud_url": "an http:// or https:// URL",
    "retention": "a positive number of seconds",
    "probe_interval": "a positive number of seconds",
    "insecure": "true or false",
    "unknown_token_policy": "one of refuse, accept_limited",
    "unknown_token_max_wh": "a positive whole number of Wh",
    "unknown_token_max_minutes": "a positive whole number of minutes",
    "max_power_kw": "a number of kW above 0, at most 4000",
    "connector_max_power_kw": 'a table of connector number = kW, e.g. {"1" = 22}',
}
"""What each setting must be, in words, for the refusal (every key of `RULES`, and the alias `mdns`)."""


class SettingsError(ValueError):
    """A setting is missing, unknown or has a value it cannot have; the message names it."""


def normalise_file(loaded: dict[str, Any], source: str) -> dict[str, Any]:
    """The TOML file's table with its aliases resolved (`peers` -> `peer`, `mdns` -> `no_mdns`),
    checked against `RULES`. Raises SettingsError naming the key."""
    out = dict(loaded)
    if "mdns" in out:
        if not isinstance(out["mdns"], bool):
            raise SettingsError(f"{source}: mdns = {out['mdns']!r} is not valid: it must be {WHAT['mdns']}")
        out["no_mdns"] = not out.pop("mdns")
    if "peers" in out and "peer" not in out:
        out["peer"] = out.pop("peers")
    if isinstance(out.get("peer"), str):
        out["peer"] = [out["peer"]]
    check(out, source)
    return out


def check(settings: dict[str, Any], source: str, *, flag_names: bool = False) -> None:
    """Raise SettingsError for an unknown setting, else for the first (by name) whose value
    its rule refuses.

    Args:
        source: where the settings came from, for the message ("--config node.toml").
        flag_names: name keys as flags (``--http-port``) rather than TOML keys.
    """
    unknown = sorted(set(settings) - set(RULES))
    if unknown:
        raise SettingsError(
            f"{source}: unknown settings {unknown}; known: {sorted(RULES)} (and the aliases peers, mdns)"
        )
    for key in sorted(settings):
        value = settings[key]
        if not RULES[key](value):
            shown = f"--{key.replace('_', '-')}" if flag_names else key
            raise SettingsError(f"{source}: {shown} = {value!r} is not valid: it must be {WHAT[key]}")
