"""configfs-tsm: an Attester asking the guest kernel for a TDX quote or an SEV-SNP report.

Linux (6.7 and later) exposes report generation under ``/sys/kernel/config/tsm/report``: a
directory made there gets ``inblob`` (the 64 bytes of report data to write), ``outblob``
(the quote or report, made when read), ``auxblob`` (SEV-SNP's certificate table, when the
host supplies one), ``provider`` (``tdx_guest`` or ``sev_guest``) and ``generation``, which
counts writes to the entry: exactly one more after our write and our reads shows no other
writer changed the request in between. The entry is made once and reused for every quote.
"""

from __future__ import annotations

from pathlib import Path

from modelfence.confidential.attestation import REPORT_DATA_BYTES, Evidence
from modelfence.errors import ModelFenceError

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


class TsmAttester:
    """Evidence from configfs-tsm; ``root`` is another folder laid out the same in tests."""

    def __init__(self, root: Path = TSM_REPORT_ROOT, name: str = "modelfence") -> None:
        self.entry = root / name

    def _generation(self) -> int:
        return int((self.entry / "generation").read_text().strip())

    def quote(self, data: bytes, now: float) -> Evidence:
        """Hardware evidence over ``data``; its claim fields are empty hints (the verifier
        reads ``raw``)."""
        if len(data) != REPORT_DATA_BYTES:
            raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes")
        self.entry.mkdir(exist_ok=True)
        before = self._generation()
        (self.entry / "inblob").write_bytes(data)
        raw = (self.entry / "outblob").read_bytes()
        auxblob = self.entry / "auxblob"
        aux = auxblob.read_bytes() if auxblob.exists() else b""
        provider = (self.entry / "provider").read_text().strip()
        if (after := self._generation()) != before + 1:
            raise ModelFenceError(f"another writer changed the configfs-tsm request while it was read "
                                  f"(generation {before} before, {after} after)")
        if provider not in PROVIDERS:
            raise ModelFenceError(f"configfs-tsm provider {provider!r} is not one ModelFence verifies")
        return Evidence(PROVIDERS[provider], "", False, 0, data, now, raw=raw, aux=aux)
