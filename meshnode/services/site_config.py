"""The site-config service: revocations, network-key grants, id-token lists, offline authorisation.

The site config is one replicated document (`crdt.SITE_CONFIG_ID`) that every node
of a site can create (it starts from a deterministic genesis change) and that only
takes *signed* entries:

- revocations and network-key grants, signed by the site key (checked against the
  node's enrolment);
- allowed / revoked id-token entries, signed by the cloud (checked against the
  site's `cloud.pub`);
- tariffs, signed by the site key (`uplink.make_tariff_entry`, `meshnode site tariff`),
  in the `tariffs` map under `<id>@<version>`. A new session's tariff snapshot is the
  site tariff valid at its start (`tariff_snapshot`); the cloud prices with the
  verified entry it names (docs/cloud.md, "Tariffs").

An entry this node cannot verify is refused with `InvalidCommand` and changes
nothing. Entries take effect when they land, wherever they came from: the node
calls `apply` after every change of the document (its own or a peer's).

The service holds no I/O of its own: it reads the replica, and writes through the
`commit` callback the node gives it (store durably, then announce to the mesh).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from crdt import SITE_CONFIG_ID, Replica, read_site_config, site_config_put
from uplink import TariffEntryError, is_tariff_entry, select_tariff, site_tariffs, verify_tariff_entry

from .._security import (
    Authorization,
    BadSiteEntry,
    Identity,
    Limits,
    Revocations,
    Sealer,
    authorize,
    entry_key,
    open_network_key_grant,
    verify_token_list_entry,
)
from .chargers import ENTRY_PREFIX, ChargerRegistration, is_charger_entry, verify_charger_entry
from .errors import InvalidCommand

log = logging.getLogger("meshnode.site_config")

DEFAULT_UNKNOWN_TOKEN_LIMITS = Limits(max_wh=30_000, max_minutes=240)
"""What a driver the site's lists do not know may charge offline under `accept_limited`
when the node sets no limits: 30 kWh or 4 hours, whichever comes first."""

Commit = Callable[[str, list[tuple[bytes, bytes]]], Awaitable[None]]
"""Make a document's new changes durable, then tell the mesh (the node's local-write path)."""


class SiteConfigService:
    """Reads and writes the site config; decides offline authorisation from it.

    Args:
        replica: the node's documents.
        identity: the node's enrolment (None: an unenrolled node verifies no site entries
            but cloud-signed ones, if it knows no cloud key either it refuses every entry).
        sealer: the sealed transport, whose revocations and network keys follow the config.
        actor: the Automerge actor this node writes a document with.
        commit: see `Commit`.
        wall_clock: seconds since the epoch (token expiry).
        unknown_token_policy, unknown_token_limits: the offline policy for an id token the
            config neither allows nor revokes (see `security.authorize`).
    """

    def __init__(
        self,
        *,
        replica: Replica,
        identity: Identity | None,
        sealer: Sealer | None,
        actor: Callable[[str], bytes],
        commit: Commit,
        wall_clock: Callable[[], float],
        unknown_token_policy: str,
        unknown_token_limits: Limits | None,
    ) -> None:
        self.replica = replica
        self.identity = identity
        self.sealer = sealer
        self._actor = actor
        self._commit = commit
        self._wall_clock = wall_clock
        self.unknown_token_policy = unknown_token_policy
        if unknown_token_policy == "accept_limited" and unknown_token_limits is None:
            unknown_token_limits = DEFAULT_UNKNOWN_TOKEN_LIMITS  # never unbounded by default
        self.unknown_token_limits = unknown_token_limits

    def read(self) -> dict[str, Any]:
        """The config's content; empty when the document is missing or does not read as one."""
        doc = self.replica.docs.get(SITE_CONFIG_ID)
        try:
            return read_site_config(doc) if doc is not None else {}
        except Exception:
            log.warning("the site-config document does not read as one", exc_info=True)
            return {}

    def _entries(self, config: dict[str, Any], name: str) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in config.get(name, {}).items() if isinstance(v, bytes | list)}

    def apply(self) -> None:
        """Revocations and network-key grants in the site config take effect at once."""
        if self.identity is None or self.sealer is None:
            return
        entries = {k: v for k, v in self._entries(self.read(), "revocations").items() if not k.startswith(ENTRY_PREFIX)}
        self.sealer.revocations = Revocations.from_entries(entries, self.identity.site_public_key)
        for key, entry in sorted(entries.items()):
            if key.startswith("netkey:"):
                try:
                    grant = open_network_key_grant(entry, self.identity)
                except BadSiteEntry as exc:
                    log.warning("site-config entry %s refused: %s", key, exc)
                    continue
                if grant is not None:
                    self.sealer.apply_grant(grant)

    def _site(self) -> tuple[bytes, str]:
        assert self.identity is not None
        return self.identity.site_public_key, self.identity.site_name

    def charger(self, charger_id: str) -> ChargerRegistration | None:
        """The verified registration of a charge point, None if there is none (or it does not verify)."""
        if self.identity is None:
            return None
        entry = self._entries(self.read(), "revocations").get(ENTRY_PREFIX + charger_id)
        if entry is None:
            return None
        try:
            reg = verify_charger_entry(entry, *self._site())
        except BadSiteEntry as exc:
            log.warning("site-config entry %s%s refused: %s", ENTRY_PREFIX, charger_id, exc)
            return None
        return reg if reg.charger_id == charger_id else None

    def token_lists(self) -> tuple[list[str], list[str]]:
        """The id tokens the site's lists allow and revoke (verified entries only; revoked
        wins a tie, as in `authorize`): what a charger's local authorisation list holds."""
        config = self.read()
        allowed, revoked = [], []
        for token in sorted(
            set(self._entries(config, "id_tokens_allowed")) | set(self._entries(config, "id_tokens_revoked"))
        ):
            auth = self.authorize(token, None)
            if auth.reason == "allowed_list":
                allowed.append(token)
            elif auth.reason == "revoked":
                revoked.append(token)
        return allowed, revoked

    def tariffs(self) -> list[Any]:
        """The site's tariffs that verify with the site key (every version); none when not enrolled."""
        if self.identity is None:
            return []
        entries = self._entries(self.read(), "tariffs")
        good, _ = site_tariffs(entries, self.identity.site_public_key, self.identity.site_name)
        return good

    def tariff_snapshot(self) -> dict[str, Any]:
        """What a session starting now records as its tariff: the site tariff valid now, or {}."""
        tariff = select_tariff(self.tariffs(), self._wall_clock())
        return tariff.to_json() if tariff is not None else {}

    def cloud_keys(self) -> list[bytes]:
        identity = self.identity
        return [identity.cloud_public_key] if identity and identity.cloud_public_key else []

    def authorize(self, id_token: str, driver_token: str | None) -> Authorization:
        """The offline authorisation decision for a driver (see `security.authorize`)."""
        config = self.read()
        return authorize(
            id_token,
            driver_token_text=driver_token,
            allowed_entries=self._entries(config, "id_tokens_allowed"),
            revoked_entries=self._entries(config, "id_tokens_revoked"),
            policy=self.unknown_token_policy,  # type: ignore[arg-type]
            limits=self.unknown_token_limits,
            cloud_public_key=self.cloud_keys(),
            now=self._wall_clock(),
        )

    async def add_entry(self, entry: bytes) -> dict[str, Any]:
        """Put a signed site entry into the replicated site config.

        Returns:
            {"section", "key"}: where the entry went.

        Raises:
            InvalidCommand: the entry is not one this node can verify (nothing changed).
        """
        section, key = self.classify(entry)
        if key.startswith(ENTRY_PREFIX):
            current = self.charger(key[len(ENTRY_PREFIX) :])
            if current is not None and current.ts > verify_charger_entry(entry, *self._site()).ts:
                raise InvalidCommand(f"a newer registration of charger {key[len(ENTRY_PREFIX) :]!r} is in place")
        doc = self.replica.docs[SITE_CONFIG_ID]
        heads = doc.get_heads()
        doc.set_actor(self._actor(SITE_CONFIG_ID))
        site_config_put(doc, section, key, entry)
        await self._commit(SITE_CONFIG_ID, self.replica.changes_since(SITE_CONFIG_ID, heads))
        return {"section": section, "key": key}

    def classify(self, entry: bytes) -> tuple[str, str]:
        """The (section, key) a verified entry goes to. Raises InvalidCommand otherwise."""
        if self.identity is not None and is_charger_entry(entry):
            try:
                reg = verify_charger_entry(entry, *self._site())
            except BadSiteEntry as exc:
                raise InvalidCommand(f"charger registration refused: {exc}") from exc
            return "revocations", ENTRY_PREFIX + reg.charger_id
        if self.identity is not None and is_tariff_entry(entry):
            try:
                tariff = verify_tariff_entry(entry, self.identity.site_public_key)
            except TariffEntryError as exc:
                raise InvalidCommand(f"tariff refused: {exc}") from exc
            if tariff.site != self.identity.site_name:
                raise InvalidCommand(f"tariff refused: it is for site {tariff.site!r}, not {self.identity.site_name!r}")
            return "tariffs", tariff.key
        if self.identity is not None:
            try:
                key = entry_key(entry)
            except Exception:
                key = None
            if key is not None:
                if key.startswith("netkey:"):
                    try:
                        open_network_key_grant(entry, self.identity)
                    except BadSiteEntry as exc:
                        raise InvalidCommand(f"network-key grant refused: {exc}") from exc
                    return "revocations", key
                checked = Revocations.from_entries({key: entry}, self.identity.site_public_key)
                if checked.rejected:
                    raise InvalidCommand(f"revocation refused: {checked.rejected}")
                return "revocations", key
        if self.cloud_keys():
            try:
                listed = verify_token_list_entry(entry, self.cloud_keys())
            except Exception as exc:
                raise InvalidCommand(f"not a site entry this node can verify: {exc}") from exc
            return ("id_tokens_allowed" if listed.allowed else "id_tokens_revoked"), listed.token_id
        raise InvalidCommand("this node cannot verify site entries: it is not enrolled (or its site has no cloud.pub)")
