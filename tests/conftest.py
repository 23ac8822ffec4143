"""Shared fixtures for the test suite."""

from __future__ import annotations

import nacl.signing
import pytest

from crdt import EventSigner, Keyring


def make_signer(device_id: str) -> EventSigner:
    """A signer with a key derived from its name, so tests are reproducible."""
    seed = device_id.encode().ljust(32, b"\0")[:32]
    return EventSigner(device_id, nacl.signing.SigningKey(seed))


@pytest.fixture
def signer() -> EventSigner:
    return make_signer("charger-1")


@pytest.fixture
def keyring(signer: EventSigner) -> Keyring:
    return Keyring({signer.device_id: signer.public_key})
