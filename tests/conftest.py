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


# --- test tiers ----------------------------------------------------------------------
# `make test-fast` runs `pytest -m "not slow"`: logic in one process, on in-memory
# seams and trio's MockClock, in well under a minute. `make test` runs everything.
# A test is `slow` when it is marked so in its file, or when one of these rules
# (kept here, so that the tiers are decided in one place) says it needs the real
# thing: other processes, real sockets or multicast, a PostgreSQL server, or
# hundreds of generated examples.

SLOW_MODULES = {
    "test_cli", "test_demo", "test_e2e_mesh", "test_e2e_uplink", "test_imports",  # real processes
    "test_sim", "test_sweep",  # whole simulated runs, several minutes
    "test_bad_input",  # a node behind a real CoAP socket
    "test_coap_field",  # real CoAP sockets, loss and floods, meshnode processes on the default port
    "test_field_transport",  # real CoAP sockets on the real clock; blocks the loop for a second on purpose
    "test_coap_loss",  # real CoAP over a lossy UDP relay, aiocoap's retransmission timers on the real clock
}  # fmt: skip
SLOW_FIXTURES = {"coap_rig", "loopback_multicast", "pg_server", "pg_url"}
SLOW_PARAMS = ("coap", "mdns", "postgresql")
SLOW_TESTS = {
    "test_store.py::test_acknowledged_writes_survive_sigkill",  # SIGKILLs 20 child processes
    "test_sim_parts.py::test_cli_run_writes_results_and_plots",  # meshsim in a subprocess
    "test_sim_parts.py::test_cli_reports_a_bad_scenario",
    "test_uplink_probe.py::test_cloud_client_over_real_http",
    "test_discovery.py::test_mdns_on_an_address_we_do_not_have_fails_cleanly",
    "test_fuzz.py::test_short_fuzz_run_finds_no_crash_no_change_and_flat_memory",  # atheris in a child process
    # `meshnode` / `python -m` in child processes: each pays a full interpreter and import start-up
    "test_metrics.py::test_log_format_json_writes_one_object_per_line",
    "test_service.py::test_the_cli_prints_each_file",
    "test_service.py::test_the_packaged_unit_passes_systemd_analyze_verify",  # systemd-analyze
    "test_service.py::test_verify_reports_a_bad_setting",  # systemd-analyze
    "test_tariffs.py::test_meshnode_site_tariff_signs_an_entry_the_site_key_verifies",
}


def _is_slow(item: pytest.Item) -> bool:
    module = item.path.stem
    if module in SLOW_MODULES or f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS:
        return True
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(p in callspec.id for p in SLOW_PARAMS):
        return True
    return bool(getattr(getattr(item, "obj", None), "is_hypothesis_test", False))  # many examples


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
