"""Operator commands and options: `meshnode site tariff`, structured logs.

Kept apart from `cli.py` so the command line gains a line per feature, not a screen.

- `meshnode site tariff`: sign a tariff with the site key (`uplink.make_tariff_entry`)
  and hand it to a node, like a revocation; it travels in the site config to every
  node and, through the leader, to the cloud, which prices sessions with it. There
  is no built-in price: a session no site tariff covers is billed unpriced (energy,
  no money) and priced if a tariff valid at its start arrives later (docs/cloud.md).
- `--log-format json`: one JSON object per log line (`JsonFormatter`), for log
  collectors; `text` (the default) is the human format.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _timestamp(text: str) -> float:
    """An ISO 8601 date or date-time (UTC unless it says otherwise) as seconds since the epoch."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or date-time: {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def add_tariff_arguments(site_sub: Any) -> Any:
    tariff = site_sub.add_parser(
        "tariff",
        help="sign a tariff with the site key; it travels in the site config and prices sessions in the cloud",
        description="Sign a tariff (prices in major units of the currency, e.g. 0.39 for 39 cents) with the site "
        "key. A new version of the same --id replaces the old one from its --valid-from on; the cloud prices a "
        "session with the tariff valid at its start. Hand the printed entry to a node (--http).",
    )
    tariff.add_argument("--site", default=".", metavar="DIR", help="the site's folder, with site.key (default .)")
    tariff.add_argument("--id", dest="tariff_id", default="default", help="tariff id (default 'default')")
    tariff.add_argument("--version", dest="tariff_version", type=int, default=1, help="version, from 1 (default 1)")
    tariff.add_argument("--currency", default="EUR", help="ISO 4217 code (default EUR)")
    tariff.add_argument("--energy", required=True, metavar="PRICE", help="price per kWh, e.g. 0.39")
    tariff.add_argument("--time", default="0", metavar="PRICE", help="price per hour of charging (default 0)")
    tariff.add_argument("--idle", default="0", metavar="PRICE", help="price per hour plugged in after charging ends")
    tariff.add_argument("--idle-grace-minutes", type=int, default=0, help="idle minutes not charged (default 0)")
    tariff.add_argument("--valid-from", type=_timestamp, metavar="ISO8601", help="default: now")
    tariff.add_argument("--valid-to", type=_timestamp, metavar="ISO8601", help="default: open-ended")
    tariff.add_argument("--http", metavar="URL", help="hand the entry to this node's API")
    return tariff


def parse_tariff_args(argv: list[str]) -> argparse.Namespace:
    """`meshnode site tariff ARGV...` parsed by the command's own parser (for `meshnode demo`,
    which signs its site's tariff through the same path as the command)."""
    parser = argparse.ArgumentParser(prog="meshnode site")
    add_tariff_arguments(parser.add_subparsers(dest="site_command"))
    return parser.parse_args(["tariff", *argv])


def make_tariff(args: argparse.Namespace, now: float) -> bytes:
    """The signed tariff entry for `meshnode site tariff`. Raises LocalSecurityError."""
    from uplink import TariffEntryError, make_tariff_entry

    from ._security import LocalSecurityError, load_site

    site = load_site(Path(args.site))
    try:
        return make_tariff_entry(
            site.require_signing_key(),
            site=site.name,
            tariff_id=args.tariff_id,
            version=args.tariff_version,
            currency=args.currency,
            energy_per_kwh=args.energy,
            time_per_hour=args.time,
            idle_per_hour=args.idle,
            idle_grace_minutes=args.idle_grace_minutes,
            valid_from=args.valid_from if args.valid_from is not None else now,
            valid_to=args.valid_to,
            now=now,
        )
    except TariffEntryError as exc:
        raise LocalSecurityError(f"tariff refused: {exc}") from exc


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601 UTC), level, logger, message, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger on stderr, in the text or the JSON format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
