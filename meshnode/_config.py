"""The settings of `meshnode run`: one JSON Schema for the TOML file and the flags.

`--config FILE` (TOML) uses the flags' names without the dashes (``coap_port = 5683``,
``peer = ["10.0.0.2:5683"]``; ``peers`` and ``mdns = false`` are accepted too). Every
value is checked against `RUN_SCHEMA` (JSON Schema, validated with `jsonschema`)
before anything starts, and a refusal names the key, the value and what it must be:
``--config node.toml: log_level = 'verbose' is not valid: it must be one of debug,
info, warning, error``. A type that TOML allows but the setting does not
(``mdns = "no"``, ``peer = 5``) is refused the same way, never reinterpreted.
"""

from __future__ import annotations

from typing import Any

import jsonschema

PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
SECONDS = {"type": "number", "exclusiveMinimum": 0}
KW = {"type": "number", "exclusiveMinimum": 0, "maximum": 4000}

RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "node_id": {"type": ["string", "null"], "pattern": r"^[A-Za-z0-9._:-]{1,128}$"},
        "data_dir": {"type": "string", "minLength": 1},
        "bind": {"type": "string", "minLength": 1},
        "coap_port": PORT,
        "http_port": PORT,
        "ocpp_port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "ocpp_certfile": {"type": ["string", "null"], "minLength": 1},
        "ocpp_keyfile": {"type": ["string", "null"], "minLength": 1},
        "peer": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "no_mdns": {"type": "boolean"},
        "site": {"type": "string", "minLength": 1, "maxLength": 128},
        "log_level": {"enum": ["debug", "info", "warning", "error"]},
        "log_format": {"enum": ["text", "json"]},
        "cloud_url": {"type": ["string", "null"], "pattern": r"^https?://[^\s]+$"},
        "retention": SECONDS,
        "probe_interval": SECONDS,
        "insecure": {"type": "boolean"},
        "unknown_token_policy": {"enum": ["refuse", "accept_limited"]},
        "unknown_token_max_wh": {"type": ["integer", "null"], "minimum": 1},
        "unknown_token_max_minutes": {"type": ["integer", "null"], "minimum": 1},
        "max_power_kw": KW,
        "connector_max_power_kw": {
            "type": "object",
            "patternProperties": {r"^[0-9]{1,4}$": KW},
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
"""Every setting of `meshnode run`, as the TOML file and the merged settings must be."""

WHAT: dict[str, str] = {
    "node_id": "1 to 128 letters, digits or . _ : -",
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
"""What each setting must be, in words (the refusal says this rather than the schema's text)."""


class SettingsError(ValueError):
    """A setting is missing, unknown or has a value it cannot have; the message names it."""


def normalise_file(loaded: dict[str, Any], source: str) -> dict[str, Any]:
    """The TOML file's table with its aliases resolved (`peers` -> `peer`, `mdns` -> `no_mdns`),
    checked against the schema. Raises SettingsError naming the key."""
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
    """Raise SettingsError for the first setting that the schema refuses.

    Args:
        source: where the settings came from, for the message ("--config node.toml").
        flag_names: name keys as flags (``--http-port``) rather than TOML keys.
    """
    unknown = sorted(set(settings) - set(RUN_SCHEMA["properties"]))
    if unknown:
        raise SettingsError(
            f"{source}: unknown settings {unknown}; known: {sorted(RUN_SCHEMA['properties'])} "
            "(and the aliases peers, mdns)"
        )
    validator = jsonschema.Draft202012Validator(RUN_SCHEMA)
    errors = sorted(validator.iter_errors(settings), key=lambda e: [str(p) for p in e.path])
    if not errors:
        return
    error = errors[0]
    key = str(error.path[0]) if error.path else "?"
    shown = f"--{key.replace('_', '-')}" if flag_names else key
    value = settings.get(key)
    raise SettingsError(f"{source}: {shown} = {value!r} is not valid: it must be {WHAT.get(key, error.message)}")
