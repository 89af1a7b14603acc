"""The verifier for each TEE type a key broker accepts, imported only when configured.

``sim`` needs the simulated platform's public key; ``tdx``, ``sev-snp`` and ``nitro``
verify against the vendors' root certificates pinned in ``trust/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import import_module

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelfence.confidential.attestation import SimVerifier, Verifier
from modelfence.errors import ModelFenceError

HARDWARE = {
    "tdx": "modelfence.confidential.tdx:TdxVerifier",
    "sev-snp": "modelfence.confidential.snp:SnpVerifier",
    "nitro": "modelfence.confidential.nitro:NitroVerifier",
}


def verifiers(tee_types: Iterable[str], sim_platform_public_key: bytes | None) -> dict[str, Verifier]:
    out: dict[str, Verifier] = {}
    for tee_type in tee_types:
        if tee_type == "sim":
            if sim_platform_public_key is None:
                raise ModelFenceError("tee type 'sim' needs the sim platform's public key")
            out[tee_type] = SimVerifier(Ed25519PublicKey.from_public_bytes(sim_platform_public_key))
        elif tee_type in HARDWARE:
            module, _, name = HARDWARE[tee_type].partition(":")
            out[tee_type] = getattr(import_module(module), name)()
        else:
            raise ModelFenceError(f"no verifier for tee type {tee_type!r}; "
                                  f"known: sim, {', '.join(HARDWARE)}")
    return out
