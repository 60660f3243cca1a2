"""Read W&B offline runs (`wandb/offline-run-*/run-*.wandb`) without the network or a W&B server.

wandb ships no Python reader for its `.wandb` files; this one is enough to compare runs offline.
The file is LevelDB-log framed (checked against files written by wandb 0.31):

    file header, 7 bytes:   b":W&B", magic u16 0xBEE1 (little endian), version u8 (0)
    then 32 KiB blocks of:  crc u32 | length u16 | type u8 | payload   (little endian)
        crc  = zlib.crc32(type byte + payload); type 1 = a whole record, 2/3/4 = first/middle/last
        fragment of one that does not fit; a fragment never crosses a block end and a block tail
        shorter than a 7-byte header is zero padding.

Each reassembled payload is one serialized `wandb_internal_pb2.Record`. Values are JSON text
(`value_json`); a key is either `key` or a path `nested_key` (a logged dict `{"a": {"b": 1}}`
becomes `nested_key: ["a", "b"]`, while "val/acc" stays one key).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

FILE_HEADER_SIZE = 7
FILE_IDENT = b":W&B"
BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path  # the run-*.wandb file
    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # without wandb's own "_wandb" key
    summary: dict[str, Any] = field(default_factory=dict)  # last value of every key, nested as logged
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per log call (with _step etc.)
    exit_code: int | None = None
    finished: bool = False  # an exit record was written: run.finish() ran


def iter_record_payloads(data: bytes) -> Iterator[bytes]:
    """Yield the payload of every record in a .wandb file's bytes, fragments reassembled."""
    if not data.startswith(FILE_IDENT) or len(data) < FILE_HEADER_SIZE:
        raise ValueError(f"not a .wandb file (header {data[:FILE_HEADER_SIZE]!r})")
    position, fragments = FILE_HEADER_SIZE, []
    while position + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # zero padding at the end of a block
            position += left_in_block
            continue
        crc, length, record_type = RECORD_HEADER.unpack_from(data, position)
        payload_start = position + RECORD_HEADER.size
        payload = data[payload_start : payload_start + length]
        if len(payload) < length:
            break  # the writer was killed mid-record: keep what was written before it
        if zlib.crc32(bytes([record_type]) + payload) != crc:
            raise ValueError(f"crc mismatch in record at byte {position}")
        position = payload_start + length
        fragments.append(payload)
        if record_type in (FULL, LAST):
            yield b"".join(fragments)
            fragments = []


def _decode_value(item) -> Any:
    # wandb 0.31's HistoryItem can also carry a typed value (oneof "value"); it keeps 1.0 a float,
    # whereas wandb-core writes 0.0 into value_json as "0". Use it when the writer set it.
    typed_case = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if typed_case == "json":
        return json.loads(item.json)
    if typed_case is not None:
        return None if typed_case == "none" else getattr(item, typed_case)
    return json.loads(item.value_json) if item.value_json else None


def _decode_items(items) -> Iterator[tuple[list[str], Any]]:
    """(key path, decoded value) for config, summary and history items."""
    for item in items:
        yield list(item.nested_key) or [item.key], _decode_value(item)


def _set_nested(target: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def _remove_nested(target: dict, path: list[str]) -> None:
    for key in path[:-1]:
        target = target.get(key, {})
    target.pop(path[-1], None)


def read_offline_run(path: str | os.PathLike) -> OfflineRun:
    """Read one run from its run-*.wandb file or from the offline-run-* dir that holds it."""
    path = Path(path)
    if path.is_dir():
        wandb_files = sorted(path.glob("run-*.wandb"))
        if len(wandb_files) != 1:
            raise FileNotFoundError(f"expected one run-*.wandb file in {path}, found {len(wandb_files)}")
        path = wandb_files[0]
    run = OfflineRun(path=path)
    for payload in iter_record_payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as error:  # raised as ValueError, like framing errors: one type to catch
            raise ValueError(f"{path}: a record is not a wandb Record ({error})") from error
        kind = record.WhichOneof("record_type")
        if kind == "run":  # written at init; config updates arrive later as "config" records
            info = record.run
            run.run_id, run.project = info.run_id or run.run_id, info.project or run.project
            run.name, run.group = info.display_name or run.name, info.run_group or run.group
            run.tags = list(info.tags) or run.tags
            for key_path, value in _decode_items(info.config.update):
                _set_nested(run.config, key_path, value)
            for key_path, value in _decode_items(info.summary.update):
                _set_nested(run.summary, key_path, value)
        elif kind in ("config", "summary"):
            target = run.config if kind == "config" else run.summary
            for key_path, value in _decode_items(getattr(record, kind).update):
                _set_nested(target, key_path, value)
            for key_path, _ in _decode_items(getattr(record, kind).remove):
                _remove_nested(target, key_path)
        elif kind == "history":
            row: dict[str, Any] = {}
            for key_path, value in _decode_items(record.history.item):
                _set_nested(row, key_path, value)
            run.history.append(row)
        elif kind == "exit":
            run.exit_code, run.finished = record.exit.exit_code, True
    run.config.pop("_wandb", None)
    run.summary.pop("_wandb", None)
    return run


def find_offline_runs(root: str | os.PathLike) -> list[Path]:
    """Every run-*.wandb file under root (a job dir, a sweep dir, a wandb dir, or the file itself)."""
    root = Path(root)
    if root.is_file():
        return [root] if root.name.startswith("run-") and root.suffix == ".wandb" else []
    # os.walk does not follow symlinks, so wandb/latest-run does not list its run a second time
    return sorted(
        Path(dirpath) / filename
        for dirpath, _, filenames in os.walk(root)
        for filename in filenames
        if filename.startswith("run-") and filename.endswith(".wandb")
    )
