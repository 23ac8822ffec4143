"""The settings rules of `meshnode run` (meshnode/_config.py): real bad values, clear refusals.

The rules replaced a JSON Schema checked with `jsonschema`; that schema is kept here as an
oracle: for any value, the rules accept what it accepted, except the three things the
module's docstring names (a whole float for an integer, NaN, a trailing newline after a
pattern), which the rules refuse.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode._config import RULES, WHAT, SettingsError, check, normalise_file
from meshnode.cli import RUN_DEFAULTS, ConfigError, build_parser, resolve_run_settings

PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
SECONDS = {"type": "number", "exclusiveMinimum": 0}
KW = {"type": "number", "exclusiveMinimum": 0, "maximum": 4000}
OLD_SCHEMA: dict[str, Any] = {
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
"""The JSON Schema the settings were checked against before (meshnode 0.1)."""

INTEGERS = {"coap_port", "http_port", "ocpp_port", "unknown_token_max_wh", "unknown_token_max_minutes"}


def old_accepts(key: str, value: Any) -> bool:
    return jsonschema.Draft202012Validator(OLD_SCHEMA).is_valid({key: value})


def refused_on_purpose(key: str, value: Any) -> bool:
    """What the old schema let through and the rules refuse (the module docstring's three)."""

    def bad_number(v: Any) -> bool:
        return isinstance(v, float) and (math.isnan(v) or (key in INTEGERS and v.is_integer()))

    def trailing_newline(v: Any) -> bool:
        return isinstance(v, str) and v.endswith("\n")

    if key == "connector_max_power_kw" and isinstance(value, dict):
        return any(trailing_newline(k) or bad_number(v) for k, v in value.items())
    return bad_number(value) or (key in ("node_id", "cloud_url") and trailing_newline(value))


def test_every_setting_has_a_rule_a_default_and_words() -> None:
    assert set(RULES) == set(OLD_SCHEMA["properties"]) == set(RUN_DEFAULTS)
    assert set(WHAT) == set(RULES) | {"mdns"}
    check(dict(RUN_DEFAULTS), "defaults")  # the defaults pass their own rules


# Real bad values a user writes, each with the words its refusal must contain.
BAD = [
    ("node_id", "bay 7", "letters, digits"),
    ("node_id", "x" * 129, "1 to 128"),
    ("node_id", "", "1 to 128"),
    ("node_id", "bay-7\n", "letters, digits"),
    ("node_id", 7, "letters, digits"),
    ("data_dir", "", "path to a directory"),
    ("data_dir", ["/var/lib"], "path to a directory"),
    ("bind", "", "address of this host"),
    ("coap_port", 0, "port number from 1 to 65535"),
    ("coap_port", 70000, "port number from 1 to 65535"),
    ("coap_port", "5683", "port number"),
    ("coap_port", 5683.0, "port number"),
    ("coap_port", True, "port number"),
    ("http_port", -1, "port number"),
    ("ocpp_port", 65536, "or 0 \\(no OCPP\\)"),
    ("ocpp_certfile", "", "PEM certificate"),
    ("ocpp_keyfile", 1, "PEM key"),
    ("peer", 5, "HOST:PORT"),
    ("peer", ["10.0.0.2:5683", ""], "HOST:PORT"),
    ("peer", [["10.0.0.2:5683"]], "HOST:PORT"),
    ("no_mdns", "no", "true or false"),
    ("no_mdns", 0, "true or false"),
    ("site", "", "1 to 128 characters"),
    ("site", "s" * 129, "1 to 128 characters"),
    ("log_level", "verbose", "one of debug, info, warning, error"),
    ("log_level", "INFO", "one of debug"),
    ("log_format", "xml", "text or json"),
    ("cloud_url", "ftp://x", "http:// or https://"),
    ("cloud_url", "https://cloud example", "http:// or https://"),
    ("cloud_url", "https://", "http:// or https://"),
    ("retention", -1, "positive number of seconds"),
    ("retention", 0, "positive number of seconds"),
    ("retention", math.nan, "positive number of seconds"),
    ("retention", "1h", "positive number of seconds"),
    ("probe_interval", False, "positive number of seconds"),
    ("insecure", "yes", "true or false"),
    ("unknown_token_policy", "accept", "refuse, accept_limited"),
    ("unknown_token_max_wh", 0, "positive whole number of Wh"),
    ("unknown_token_max_wh", 1.5, "whole number of Wh"),
    ("unknown_token_max_minutes", -5, "whole number of minutes"),
    ("max_power_kw", 0, "above 0, at most 4000"),
    ("max_power_kw", 4000.5, "at most 4000"),
    ("max_power_kw", math.inf, "at most 4000"),
    ("connector_max_power_kw", {"1": 0}, "connector number = kW"),
    ("connector_max_power_kw", {"one": 22}, "connector number = kW"),
    ("connector_max_power_kw", {"12345": 22}, "connector number = kW"),
    ("connector_max_power_kw", {"1": "22"}, "connector number = kW"),
    ("connector_max_power_kw", [22], "connector number = kW"),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v!r}"[:60] for k, v, _ in BAD])
def test_a_bad_value_is_refused_naming_the_key_the_value_and_what_it_must_be(key, value, words) -> None:
    with pytest.raises(SettingsError) as refused:
        check({**RUN_DEFAULTS, key: value}, "--config node.toml")
    message = str(refused.value)
    assert message.startswith(f"--config node.toml: {key} = {value!r} is not valid: it must be {WHAT[key]}")
    assert re.search(words, message)
    # From the command line the key is named as its flag.
    with pytest.raises(SettingsError, match=f"^command line: --{key.replace('_', '-')} = "):
        check({**RUN_DEFAULTS, key: value}, "command line", flag_names=True)


GOOD = [
    ("node_id", None), ("node_id", "bay-7.site:a_1"), ("node_id", "x" * 128), ("coap_port", 1),
    ("coap_port", 65535), ("ocpp_port", 0), ("ocpp_certfile", None), ("ocpp_certfile", "/etc/cp.pem"),
    ("peer", []), ("peer", ["10.0.0.2:5683"]), ("site", "s" * 128), ("cloud_url", "http://10.0.0.9:8443/x"),
    ("cloud_url", None), ("retention", 0.5), ("retention", 86400), ("retention", math.inf),
    ("unknown_token_max_wh", None), ("unknown_token_max_wh", 30000), ("max_power_kw", 4000),
    ("max_power_kw", 0.001), ("connector_max_power_kw", {}), ("connector_max_power_kw", {"1": 22, "0002": 7.4}),
    ("log_format", "json"), ("no_mdns", True),
]  # fmt: skip


@pytest.mark.parametrize("key,value", GOOD)
def test_a_good_value_passes(key, value) -> None:
    check({**RUN_DEFAULTS, key: value}, "--config node.toml")
    assert old_accepts(key, value)


def test_the_bad_values_are_bad_for_the_old_schema_too_but_for_the_three_named_differences() -> None:
    for key, value, _ in BAD:
        assert old_accepts(key, value) == refused_on_purpose(key, value), (key, value)


def test_unknown_settings_are_listed_before_any_value_is_judged() -> None:
    with pytest.raises(SettingsError) as refused:
        check({"colour": 1, "coap_port": 0, "verbose": True}, "--config node.toml")
    assert str(refused.value).startswith("--config node.toml: unknown settings ['colour', 'verbose']; known: [")
    assert "(and the aliases peers, mdns)" in str(refused.value)


def test_the_first_bad_setting_by_name_is_the_one_named() -> None:
    with pytest.raises(SettingsError, match="^x: http_port = 0 "):
        check({"retention": -1, "http_port": 0, "log_level": "loud"}, "x")


def test_the_file_aliases() -> None:
    out = normalise_file({"peers": "10.0.0.2:5683", "mdns": False}, "f")
    assert out == {"peer": ["10.0.0.2:5683"], "no_mdns": True}
    with pytest.raises(SettingsError, match="^f: mdns = 'no' is not valid: it must be true or false$"):
        normalise_file({"mdns": "no"}, "f")
    with pytest.raises(SettingsError, match="^f: peer = 5 is not valid"):
        normalise_file({"peers": 5}, "f")


def test_a_bad_file_stops_meshnode_run_with_one_line(tmp_path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('log_level = "verbose"\n')
    args = build_parser().parse_args(["run", "--config", str(cfg)])
    with pytest.raises(ConfigError) as refused:
        resolve_run_settings(args)
    assert str(refused.value) == (
        f"--config {cfg}: log_level = 'verbose' is not valid: it must be one of debug, info, warning, error"
    )
    cfg.write_text("coap_port = 5683.0\n")
    with pytest.raises(ConfigError, match="coap_port = 5683.0 is not valid: it must be a port number"):
        resolve_run_settings(build_parser().parse_args(["run", "--config", str(cfg)]))
    cfg.write_text('connector_max_power_kw = {"1" = 22, "2" = -3}\n')
    with pytest.raises(ConfigError, match=r"connector_max_power_kw = \{'1': 22, '2': -3\} is not valid"):
        resolve_run_settings(build_parser().parse_args(["run", "--config", str(cfg)]))


def test_checking_the_settings_imports_no_jsonschema() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from meshnode.cli import build_parser, resolve_run_settings
            resolve_run_settings(build_parser().parse_args(["run", "--insecure", "--no-mdns"]))
            print("jsonschema" in sys.modules)
        """)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


STRINGS = [
    "", "a", "debug", "json", "refuse", "accept_limited", "bay-7", "bay-7\n", "http://x", "https://x y",
    "http://x\n", "1", "0002", "12345", "x" * 128, "x" * 129,
]  # fmt: skip

# Values of every kind TOML can hold (and None, which the flags' defaults use), edges included.
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 65535, 65536, 4000, 4001, 2**63 - 1])
    | st.integers()
    | st.sampled_from([0.0, 0.5, 1.0, 5683.0, 4000.0, 4000.0001, -0.0, math.inf, -math.inf, math.nan])
    | st.floats()
    | st.sampled_from(STRINGS)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["1", "0002", "x", "1\n"]), inner),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(sorted(RULES)), value=VALUES)
def test_the_rules_accept_what_the_old_schema_accepted(key, value) -> None:
    accepted = RULES[key](value)
    if refused_on_purpose(key, value):
        assert not accepted
    else:
        assert accepted == old_accepts(key, value)
