"""Charging-session documents: signed events, Automerge documents, their fold, storage and sync.

This package opens no sockets and reads no clocks; time comes in as arguments.
"""

from ._documents import (
    SITE_CONFIG_ID,
    SITE_MAPS,
    SessionData,
    add_event,
    add_note,
    fold_session,
    new_session_doc,
    new_site_config,
    read_session,
    read_site_config,
    session_keyring,
    set_receipt,
    site_config_put,
)
from ._errors import (
    BadSignature,
    BrokenChain,
    CrdtError,
    DocumentError,
    EventError,
    InvalidSyncMessage,
    LocalError,
    MalformedEvent,
    MissingField,
    RemoteError,
    StoreError,
    UnknownKey,
)
from ._events import (
    EVENT_CACHE,
    GENESIS_PREV,
    MAX_EVENT_BYTES,
    EventCache,
    EventRecord,
    EventSigner,
    Keyring,
    SignedEvent,
    check_link,
    decode_event,
    verify_event,
)
from ._fold import EVENT_TYPES, STATES, TRANSITIONS, Conflict, SessionFold, SessionView, fold, summarize_event
from ._fold import DEFAULT_MAX_POWER_W, IMPLAUSIBLE_METER, meter_plausibility, session_max_power_w
from ._store import AsyncDocStore, DocStore, Documents, StoreOpener, open_doc_store
from ._sync_session import Applied, SyncRound, SyncSession
from ._sync import (
    DEFAULT_BUCKETS,
    Replica,
    SyncBook,
    bucket_entries,
    bucket_of,
    decode_sync_message,
    differing_buckets,
    differing_docs,
    heads_hash,
    make_digest,
)
from .store import MemoryAdapter, SqliteAdapter, StorageAdapter, StorageKey

__all__ = [name for name in dir() if not name.startswith("_")]
