"""Who is calling: API keys, their durable store and hot-path cache, and fingerprints."""

from modelfence.identity.base import ApiKeyRecord, Fingerprint, KeyStore, LimitOverrides
from modelfence.identity.failures import AuthFailures, FailureLimiter
from modelfence.identity.fingerprint import Fingerprinter, client_library, compute_fingerprint
from modelfence.identity.keys import new_api_key
from modelfence.identity.registry import KeyRegistry
from modelfence.identity.secret import ServerSecret, load_server_secret
from modelfence.identity.sql_store import SqlKeyStore

__all__ = [
    "ApiKeyRecord",
    "AuthFailures",
    "FailureLimiter",
    "Fingerprint",
    "Fingerprinter",
    "KeyRegistry",
    "KeyStore",
    "LimitOverrides",
    "ServerSecret",
    "SqlKeyStore",
    "client_library",
    "compute_fingerprint",
    "load_server_secret",
    "new_api_key",
]
