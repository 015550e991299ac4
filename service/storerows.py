"""Rows <-> records, shared by the stores (:mod:`.store`'s SQLite, :mod:`.pgstore`'s PostgreSQL).

Both keep the JSON columns (:data:`JSON_COLUMNS`) as JSON text and hand the service typed records
(:mod:`.records`). A row may hold columns its record does not know (the queue's lease columns of a
later schema): they are left out of the record.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .records import DeliveryRecord, ImageRecord, JobRecord, NewImage, SessionRecord

#: the columns that hold JSON text (Python values in records and in ``update_*`` keywords)
JSON_COLUMNS = frozenset({"loras", "seeds", "prompt", "negative_prompt", "params", "error", "timings", "skipped"})
#: seeds go up to 2**64-1; SQLite's signed 64-bit integers hold a seed of 2**63 or more as its two's
#: complement (seeds are never negative, so a negative value read back is such a seed)
U64 = 2**64

R = TypeVar("R", SessionRecord, JobRecord, ImageRecord, DeliveryRecord)


@functools.cache
def _fields(record: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(record))


def decode_row(row: Mapping[str, Any] | None, record: type[R]) -> R | None:
    """A record from a row (column name -> value); None for None. JSON columns are parsed, a seed
    stored as two's complement (SQLite) or NUMERIC (PostgreSQL) becomes the unsigned int."""
    if row is None:
        return None
    names = _fields(record)
    out = {k: v for k, v in dict(row).items() if k in names}
    seed = out.get("seed")
    if isinstance(seed, Decimal):
        out["seed"] = int(seed)
    elif isinstance(seed, int) and seed < 0:
        out["seed"] = seed + U64
    for k in JSON_COLUMNS & out.keys():
        if out[k] is not None:
            out[k] = json.loads(out[k])
    return record(**out)


def encode_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Column values to store: the JSON columns as JSON text, the others as they are."""
    return {k: (json.dumps(v) if k in JSON_COLUMNS and v is not None else v) for k, v in fields.items()}


def record_columns(record: SessionRecord | JobRecord) -> dict[str, Any]:
    """A record's columns for an INSERT (``seq`` is the store's to give)."""
    return encode_fields({k: v for k, v in dataclasses.asdict(record).items() if k != "seq"})


def new_image_columns(image: NewImage, index: int, seed: int) -> dict[str, Any]:
    """The columns of a reserved (``writing``) image row: ``index`` in its session, ``seed`` as the store keeps it."""
    return {"id": image.id, "session_id": image.session_id, "job_id": image.job_id, "idx": index, "pos": image.pos,
            "seed": seed, "width": image.width, "height": image.height,
            "path": str(Path(image.folder) / f"{index:05d}.png"), "state": "writing"}


def signed_seed(seed: int) -> int:
    """A seed (0 ... 2**64-1) as SQLite's signed 64-bit integer (its two's complement from 2**63)."""
    seed = int(seed)
    return seed - U64 if seed >= 2**63 else seed
