"""``modelfence seal`` and ``modelfence inspect``: the confidential layer's commands.

There is no unseal command: a sealed part is opened only inside the isolated worker, with
the data key the broker releases after attestation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelfence.confidential.keyfile import read_key_file, write_key_file
from modelfence.confidential.partition import PartitionError, split
from modelfence.confidential.sealing import (
    DEFAULT_CHUNK_BYTES,
    SealedHeader,
    SealError,
    load_tensors,
    read_header,
    seal,
)
from modelfence.errors import ModelFenceError

console = Console()
errors = Console(stderr=True)


def describe(header: SealedHeader) -> dict[str, object]:
    """The header as ``inspect --json`` prints it (no key material beyond the wrapped key's id)."""
    return {
        "artifact_id": header.artifact_id,
        "version": header.version,
        "digest": header.digest,
        "created_at": header.created_at,
        "kek_id": header.kek_id,
        "chunk_bytes": header.chunk_bytes,
        "payload_bytes": header.payload_bytes,
        "parameters": header.parameters,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in header.tensors],
    }


def seal_command(
    source: Annotated[Path, typer.Argument(help="tensors to seal: .safetensors, .npz or .npy")],
    out: Annotated[Path, typer.Argument(help="the sealed file to write")],
    artifact_id: Annotated[str, typer.Option(help="the part's name in the broker's policy")],
    key_file: Annotated[Path, typer.Option(help="the key broker's key-encryption key")],
    version: Annotated[int, typer.Option(min=1, help="release version (the broker refuses older ones)")] = 1,
    new_key: Annotated[bool, typer.Option("--new-key", help="create --key-file first (mode 0600)")] = False,
    chunk_bytes: Annotated[int, typer.Option(help="bytes per authenticated chunk")] = DEFAULT_CHUNK_BYTES,
    protect: Annotated[list[str] | None, typer.Option(
        help="seal only these modules or globs (e.g. head, 'adapter.*'); repeatable")] = None,
) -> None:
    """Seal a model part: encrypt its tensors for release to an attested worker only."""
    try:
        tensors = load_tensors(source)  # before a new key exists: a failed seal leaves none
        if protect:
            public, tensors = split(tensors, protect)
            console.print(f"protected {len(tensors)} tensors; {len(public)} stay public in {source}",
                          markup=False)
        kek = write_key_file(key_file) if new_key else read_key_file(key_file)
        header = seal(tensors, out, kek=kek, artifact_id=artifact_id, version=version,
                      chunk_bytes=chunk_bytes)
    except (SealError, PartitionError) as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from exc
    console.print(f"sealed {len(header.tensors)} tensors ({header.parameters:,} parameters) of "
                  f"{header.artifact_id!r} v{header.version} into {out}", markup=False)
    console.print(f"digest {header.digest}  key {header.kek_id}", markup=False)


def inspect_command(
    sealed: Annotated[Path, typer.Argument(help="a file written by modelfence seal")],
    as_json: Annotated[bool, typer.Option("--json", help="print the header as JSON")] = False,
) -> None:
    """Show a sealed part's header: artifact, version, digest, tensors (never the weights)."""
    try:
        header = read_header(sealed)
    except (SealError, OSError) as exc:
        errors.print(f"error: {sealed}: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from exc
    if as_json:
        print(json.dumps(describe(header), indent=2))
        return
    # What a header says is the file's, not ours: never read as markup.
    console.print(f"{header.artifact_id} v{header.version}  digest {header.digest}", markup=False)
    console.print(f"sealed {header.created_at} under key {header.kek_id}; "
                  f"{header.payload_bytes:,} bytes in {header.chunks} chunks", markup=False)
    table = Table("tensor", "dtype", "shape")
    for entry in header.tensors:
        table.add_row(escape(entry.name), entry.dtype, "×".join(map(str, entry.shape)) or "scalar")
    console.print(table)


def measure_command(
    worker_config: Annotated[str, typer.Argument(metavar="WORKER_CONFIG",
        help='the worker configuration exactly as the model server passes it, e.g. \'{"output": "labels"}\'')],
) -> None:
    """Print the measurement of a worker started with WORKER_CONFIG from this installation: list it
    under ``confidential.measurements`` so the key broker releases keys to that worker only."""
    from modelfence.confidential.launcher import measurement
    from modelfence.confidential.worker import WorkerConfig

    try:
        WorkerConfig.parse(worker_config.encode())
    except ModelFenceError as exc:
        errors.print(f"error: WORKER_CONFIG: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from exc
    print(measurement(worker_config.encode()))
