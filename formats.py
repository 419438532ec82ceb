"""The two weight-file formats this project reads and writes without their libraries.

1. TensorFlow's V2 checkpoint, as in OpenAI's GPT-2 release: a LevelDB-format table of protobuf
   entries (model.ckpt.index) beside the raw tensor bytes (model.ckpt.data-00000-of-00001), each
   tensor guarded by a masked CRC-32C. Specs: tensorflow/core/util/tensor_bundle (tensor_bundle.proto),
   LevelDB's table_format.md, and the protobuf wire format.
2. Hugging Face's safetensors: an 8-byte header length, a JSON header, then the raw tensor bytes
   (github.com/huggingface/safetensors, "Format").

numpy and the standard library only: nothing here runs code from a file (no pickle), and every
size, offset and checksum is checked before a tensor's bytes are used.

Usage:
    tensors = formats.read_tf_checkpoint("gpt2/124M")          # {name: np.ndarray}, memory-mapped
    formats.write_safetensors({"w": np.zeros((2, 3), np.float32)}, "w.safetensors")
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from pathlib import Path

import numpy as np

import cli


class CheckpointError(ValueError):
    """A model file that is missing, truncated, corrupt, or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# 1. TensorFlow V2 checkpoints
#
# A checkpoint "model.ckpt" is two files:
#   model.ckpt.index                  a LevelDB-format sorted table, tensor name -> BundleEntryProto
#   model.ckpt.data-00000-of-00001    the tensors' raw little-endian bytes, one after another
# The table: [data block]... [metaindex block] [index block] [footer: 48 bytes]
#   footer = varint handles (offset, size) of metaindex and index, zero padding to 40 bytes,
#            then the fixed64 magic 0xdb4775248b80fb57
#   block  = entries, restart offsets (uint32 each), number of restarts (uint32),
#            then a 5-byte trailer: compression type (0 = none) and a masked crc32c
#   entry  = varint shared, varint non_shared, varint value_len, key[shared:], value
#            (each key stores only what differs from the key before it, except at restart points)
# The index block maps, for each data block, a key >= its last key to that block's handle.
# The entry under the empty key "" is a BundleHeaderProto; every other entry a BundleEntryProto.


TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two BlockHandles of at most 10 + 10 bytes each, padded to 40, + 8-byte magic
BLOCK_TRAILER_SIZE = 5
# Field numbers of tensorflow/core/protobuf/tensor_bundle.proto and tensor_shape.proto
HEADER_NUM_SHARDS, HEADER_ENDIANNESS = 1, 2
ENTRY_DTYPE, ENTRY_SHAPE, ENTRY_SHARD_ID, ENTRY_OFFSET, ENTRY_SIZE, ENTRY_CRC32C, ENTRY_SLICES = 1, 2, 3, 4, 5, 6, 7
SHAPE_DIM, DIM_SIZE = 2, 1
# TensorFlow DataType enum values (tensorflow/core/framework/types.proto) that map onto numpy
TF_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}
TF_DTYPE_BFLOAT16 = 14

# CRC-32C (Castagnoli), vectorised. Write R(m) for the raw CRC register after feeding message m from
# state 0 (no initial value, no final xor). The byte step is linear over GF(2), so R(m) is the xor
# of one contribution per byte: a byte b with n bytes from it to the end contributes Z(b, n), "state b
# run through n zero bytes", which for a fixed n is a 256-entry table. So:
#   1. cut the message into 64-byte blocks and get every block's R at once: one gather into 64
#      tables (one per position in the block) and an xor over the 64 columns;
#   2. join 16 neighbouring block states at a time the same way (a state is 4 more bytes, moved past
#      the blocks after it), until one state is left; zeros put in front leave R unchanged, so any
#      length is padded at the front;
#   3. the standard CRC is R(m) ^ Z(0xFFFFFFFF, len(m)) ^ 0xFFFFFFFF.
CRC_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reflected
CRC_BLOCK, CRC_GROUP, CRC_SLAB = 64, 16, 4096  # bytes per block, states per join, rows per gather


def _zero_byte(v: int) -> int:
    for _ in range(8):
        v = (v >> 1) ^ (CRC_POLY if v & 1 else 0)
    return v


def _apply(columns, v: int) -> int:
    """The GF(2) matrix given by its 32 columns (ints), times the 32-bit vector v."""
    out, bit = 0, 0
    while v:
        if v & 1:
            out ^= columns[bit]
        v, bit = v >> 1, bit + 1
    return out


@functools.cache  # the tables below are built on first use, not on every import of this file
def _zero_powers() -> list:
    """[k]: Z(., 2**k) as a matrix, for lengths below 2**48 bytes."""
    powers = [[_zero_byte(1 << bit) for bit in range(32)]]
    for _ in range(47):
        powers.append([_apply(powers[-1], c) for c in powers[-1]])
    return powers


def _shift(v: int, n: int) -> int:
    """Z(v, n): state v run through n zero bytes, by the binary expansion of n."""
    k = 0
    while n:
        if n & 1:
            v = _apply(_zero_powers()[k], v)
        n, k = n >> 1, k + 1
    return v


def _byte_tables(columns) -> np.ndarray:
    """[(n, lane)] -> one flat table, entry c * 256 + b = Z(b << 8 lane, n) for column c."""
    tables = []
    for n, lane in columns:
        t = np.zeros(256, np.uint32)
        for j in range(8):  # by linearity: the entries with bit j set = those without, xor Z(bit j)
            t[1 << j: 2 << j] = t[: 1 << j] ^ np.uint32(_shift(1 << (8 * lane + j), n))
        tables.append(t)
    return np.concatenate(tables)


@functools.cache
def _block_table() -> np.ndarray:
    """Step 1's 64 tables: byte p of a block has CRC_BLOCK - p bytes to the block's end."""
    return _byte_tables([(CRC_BLOCK - p, 0) for p in range(CRC_BLOCK)])


@functools.cache
def _join_table(spacing: int) -> np.ndarray:
    """Step 2's tables for states `spacing` bytes apart: byte i of state q moves past the
    CRC_GROUP - 1 - q blocks after it."""
    return _byte_tables([(spacing * (CRC_GROUP - 1 - q), i) for q in range(CRC_GROUP) for i in range(4)])


def _fold(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(R, 64) uint8 -> (R,) uint32: the xor over columns c of table[c * 256 + rows[:, c]]."""
    offsets = np.arange(CRC_BLOCK, dtype=np.int32) * 256
    out = np.empty(len(rows), np.uint32)
    for start in range(0, len(rows), CRC_SLAB):  # slabs keep the temporaries about 1 MB
        index = rows[start:start + CRC_SLAB].astype(np.int32) + offsets  # (r, 64)
        np.bitwise_xor.reduce(table.take(index), axis=1, out=out[start:start + CRC_SLAB])
    return out


def crc32c(data) -> int:
    """CRC-32C of bytes or a uint8 array (e.g. a slice of a memory-mapped file): 498 MB in about 1.5 s."""
    m = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    head = len(m) % CRC_BLOCK
    first = np.zeros((1 if head else 0, CRC_BLOCK), np.uint8)  # zeros in front: R unchanged
    first[:, CRC_BLOCK - head:] = m[:head]
    states = np.concatenate([_fold(first, _block_table()), _fold(m[head:].reshape(-1, CRC_BLOCK), _block_table())])
    spacing = CRC_BLOCK  # bytes between neighbouring states
    while len(states) > 1:
        states = np.concatenate([np.zeros(-len(states) % CRC_GROUP, np.uint32), states])
        states = _fold(states.astype("<u4").view(np.uint8).reshape(-1, CRC_BLOCK), _join_table(spacing))
        spacing *= CRC_GROUP
    return (int(states[0]) if len(states) else 0) ^ _shift(0xFFFFFFFF, len(m)) ^ 0xFFFFFFFF


def masked_crc32c(data) -> int:
    # LevelDB stores CRCs rotated and offset, so a CRC of data that itself holds CRCs stays useful
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf, pos, where):
    """Decode a base-128 varint at buf[pos:]; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CheckpointError(f"{where}: bad varint (file truncated or corrupt)")
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return result, pos


def _parse_proto(buf, where):
    """Decode a protobuf message into {field number: [values]} (ints, or bytes for messages)."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire in (1, 5):  # fixed64, fixed32
            size = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        elif wire == 2:
            length, pos = _varint(buf, pos, where)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        else:
            raise CheckpointError(f"{where}: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointError(f"{where}: protobuf message is truncated")
        fields.setdefault(number, []).append(value)
    return fields


def _read_block(table: bytes, offset: int, size: int, where: str) -> bytes:
    """Return one block's contents after checking its bounds, compression type and checksum."""
    if offset + size + BLOCK_TRAILER_SIZE > len(table) - FOOTER_SIZE:
        raise CheckpointError(f"{where}: block at offset {offset:,} runs past the end (file truncated?)")
    contents, kind = table[offset:offset + size], table[offset + size]
    (stored_crc,) = struct.unpack_from("<I", table, offset + size + 1)
    if masked_crc32c(contents + bytes([kind])) != stored_crc:
        raise CheckpointError(f"{where}: checksum mismatch in block at offset {offset:,} (file corrupt)")
    if kind != 0:
        raise CheckpointError(f"{where}: compressed blocks (type {kind}) are not supported")
    return contents


def _block_entries(block: bytes, where: str):
    """Yield (key, value) pairs of one block, undoing the prefix compression of the keys."""
    if len(block) < 4:
        raise CheckpointError(f"{where}: block too short")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * n_restarts  # the entries stop where the restart array starts
    if end < 0:
        raise CheckpointError(f"{where}: bad restart count {n_restarts}")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, where)
        non_shared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        if shared > len(key) or pos + non_shared + value_len > end:
            raise CheckpointError(f"{where}: corrupt block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _read_table(path: Path) -> dict[bytes, bytes]:
    """Read a whole LevelDB-format table file (the .index file) into a dict."""
    table, where = path.read_bytes(), str(path)
    if len(table) < FOOTER_SIZE:
        raise CheckpointError(f"{where}: only {len(table)} bytes, too short for a checkpoint index")
    if int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise CheckpointError(f"{where}: wrong magic number, not a TensorFlow checkpoint index")
    footer = table[-FOOTER_SIZE:]
    _, pos = _varint(footer, 0, where)  # the metaindex handle: unused by checkpoints
    _, pos = _varint(footer, pos, where)
    index_offset, pos = _varint(footer, pos, where)
    index_size, pos = _varint(footer, pos, where)
    entries = {}
    for _, handle in _block_entries(_read_block(table, index_offset, index_size, where), where):
        offset, p = _varint(handle, 0, where)
        size, _ = _varint(handle, p, where)
        entries.update(_block_entries(_read_block(table, offset, size, where), where))
    return entries


def _checkpoint_prefix(path: Path) -> Path:
    """Find the checkpoint prefix ("…/model.ckpt") from a folder, a prefix or an .index path."""
    if path.is_dir():
        state = path / "checkpoint"  # text file: model_checkpoint_path: "model.ckpt"
        if state.is_file():
            match = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"))
            if match:  # TensorFlow may have written an absolute path of another machine: use the name
                return path / Path(match.group(1)).name
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            raise CheckpointError(f"{path}: expected one *.index checkpoint file, found {len(indexes)}")
        return indexes[0].with_suffix("")
    return path.with_suffix("") if path.suffix == ".index" else path


def _bfloat16_to_float32(u16: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32, so shifting the bits back up is exact
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _memmap(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)
    # copy-on-write: the file stays untouched and the pages are read only when a tensor is used
    return np.memmap(path, dtype=np.uint8, mode="c")


def _tf_entries(index_path: Path):
    """Yield first the number of data shards, then (name, dtype id, shape, shard, offset, size,
    masked crc or None) of every tensor."""
    entries = _read_table(index_path)
    if b"" not in entries:
        raise CheckpointError(f"{index_path}: no bundle header, not a TensorFlow V2 checkpoint")
    header = _parse_proto(entries.pop(b""), str(index_path))
    if header.get(HEADER_ENDIANNESS, [0])[0] != 0:
        raise CheckpointError(f"{index_path}: big-endian checkpoints are not supported")
    yield header.get(HEADER_NUM_SHARDS, [1])[0]
    for key, value in entries.items():
        name = key.decode("utf-8", errors="replace")
        where = f"{index_path}: tensor {name!r}"
        entry = _parse_proto(value, where)
        if ENTRY_SLICES in entry:
            raise CheckpointError(f"{where} is partitioned into slices, which is not supported")
        shape = _parse_proto(entry.get(ENTRY_SHAPE, [b""])[0], where)
        dims = [_parse_proto(d, where).get(DIM_SIZE, [0])[0] for d in shape.get(SHAPE_DIM, [])]
        yield (name, entry.get(ENTRY_DTYPE, [0])[0], dims, entry.get(ENTRY_SHARD_ID, [0])[0],
               entry.get(ENTRY_OFFSET, [0])[0], entry.get(ENTRY_SIZE, [0])[0], entry.get(ENTRY_CRC32C, [None])[0])


def read_tf_checkpoint(path) -> dict[str, np.ndarray]:
    """Read every tensor of a TensorFlow V2 checkpoint as numpy arrays, names and shapes as stored.

    path: a folder holding the checkpoint, its prefix ("…/model.ckpt") or its .index file. The arrays
    are memory-mapped views of the data file. Sizes, offsets, dtypes and every block checksum of the
    index are checked; each tensor's bytes against the CRC-32C the index stores only when the file
    is downloaded (verify_tf_data), since reading them all would cost every load about 1.5 s.
    """
    prefix = _checkpoint_prefix(Path(path))
    index_path = prefix.with_name(prefix.name + ".index")
    if not index_path.is_file():
        raise CheckpointError(f"checkpoint index {index_path} not found")
    entries = _tf_entries(index_path)
    n_shards, shards, tensors = next(entries), {}, {}
    for name, dtype_id, dims, shard, offset, size, crc in entries:
        where = f"{index_path}: tensor {name!r}"
        np_dtype = np.uint16 if dtype_id == TF_DTYPE_BFLOAT16 else TF_DTYPES.get(dtype_id)
        if np_dtype is None:
            raise CheckpointError(f"{where} has unsupported dtype id {dtype_id}")
        if size != math.prod(dims) * np.dtype(np_dtype).itemsize:
            raise CheckpointError(f"{where}: shape {tuple(dims)} does not fit its {size:,} bytes")
        if shard not in shards:
            data_path = prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{n_shards:05d}")
            if not data_path.exists():
                raise CheckpointError(f"checkpoint data file {data_path} not found")
            shards[shard] = (data_path, _memmap(data_path))
        data_path, raw = shards[shard]
        if offset + size > raw.size:
            raise CheckpointError(f"{data_path}: tensor {name!r} needs bytes {offset:,}..{offset + size:,} but the "
                                  f"file has {raw.size:,} (truncated? download it again)")
        array = raw[offset:offset + size].view(np_dtype).reshape(dims)
        tensors[name] = _bfloat16_to_float32(array) if dtype_id == TF_DTYPE_BFLOAT16 else array
    return tensors


def verify_tf_data(index_path, data_path):
    """Check a downloaded data file (under any name) tensor by tensor against its index's CRC-32Cs."""
    index_path, data_path = Path(index_path), Path(data_path)
    raw, entries = _memmap(data_path), _tf_entries(index_path)
    next(entries)
    for name, _, _, _, offset, size, crc in entries:
        if offset + size > raw.size:
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        if crc is not None and masked_crc32c(raw[offset:offset + size]) != crc:
            raise ValueError(f"tensor {name!r} fails its CRC-32C check")

# Writing a checkpoint: the inverse of the reader above (bench.py and the tests make model folders
# with it). One data block per block_size bytes of entries, a restart point every 16 keys.


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 takes ten bytes, as in protobuf
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: a varint (wire type 0) for an int, length-delimited (2) for bytes."""
    if isinstance(value, int):
        return _encode_varint(number << 3) + _encode_varint(value)
    return _encode_varint(number << 3 | 2) + _encode_varint(len(value)) + value


def _table_block(items, restart_interval=16) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:  # store only what differs from the key before
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _encode_varint(shared) + _encode_varint(len(key) - shared) + _encode_varint(len(value))
        out += key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts)))


def _write_table(items, block_size=4096) -> bytes:
    """A sorted list of (key, value) pairs as a LevelDB-format table (uncompressed blocks)."""
    out, index, block, size = bytearray(), [], [], 0

    def add_block(contents):
        handle = _encode_varint(len(out)) + _encode_varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", masked_crc32c(contents + b"\x00")))
        return handle
    for i, (key, value) in enumerate(items):
        block.append((key, value))
        size += len(key) + len(value)
        if size >= block_size or i == len(items) - 1:
            index.append((key, add_block(_table_block(block))))  # the block's last key separates it
            block, size = [], 0
    metaindex = add_block(_table_block([]))
    index_handle = add_block(_table_block(index, restart_interval=1))
    return bytes(out + (metaindex + index_handle).ljust(FOOTER_SIZE - 8, b"\x00") + struct.pack("<Q", TABLE_MAGIC))


def write_tf_checkpoint(tensors: dict[str, np.ndarray], prefix, block_size=4096, with_crc=True):
    """Write tensors as <prefix>.index + <prefix>.data-00000-of-00001, each entry with the masked
    CRC-32C of its bytes as TensorFlow writes it (with_crc=False leaves it out, as old files do)."""
    prefix, dtype_ids = Path(prefix), {np.dtype(v): k for k, v in TF_DTYPES.items()}
    items, blobs, offset = [], [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        shape = b"".join(_field(SHAPE_DIM, _field(DIM_SIZE, n)) for n in array.shape)
        entry = (_field(ENTRY_DTYPE, dtype_ids[array.dtype.newbyteorder("=")]) + _field(ENTRY_SHAPE, shape)
                 + _field(ENTRY_OFFSET, offset) + _field(ENTRY_SIZE, len(raw)))
        if with_crc:  # a fixed32 field (wire type 5)
            entry += _encode_varint(ENTRY_CRC32C << 3 | 5) + struct.pack("<I", masked_crc32c(raw))
        items.append((name.encode(), entry))
        blobs.append(raw)
        offset += len(raw)
    header = _field(HEADER_NUM_SHARDS, 1) + _field(3, _field(1, 1))  # field 3: version { producer: 1 }
    cli.atomic_write_all({prefix.with_name(prefix.name + ".data-00000-of-00001"): b"".join(blobs),
                          prefix.with_name(prefix.name + ".index"): _write_table([(b"", header)] + items, block_size)})


# ----------------------------------------------------------------------------------------------
# 2. safetensors: [8-byte little-endian header length N][N bytes of JSON header][data]
# header = {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
# Offsets count from the start of the data; the tensors must tile the data exactly (no gap, no overlap).

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16,
}
MAX_HEADER = 100_000_000  # the format's own limit on the JSON header


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


def read_safetensors_header(path) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, __metadata__, where the data starts) of a safetensors file, every entry
    checked against the file before any tensor's bytes are touched."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= header_len <= min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {header_len:,} for a file of "
                                  f"{size:,} bytes; truncated?)")
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: the header is not valid JSON ({str(e)[:80]}); "
                                  "not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    data_size, spans = size - 8 - header_len, []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unknown or missing dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, not {shape!r:.60}")
        itemsize = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        # an empty tensor's other dimensions must still make an array numpy can describe
        if len(shape) > 32 or math.prod(max(d, 1) for d in shape) * itemsize >= 2**63:
            raise CheckpointError(f"{where}: shape {shape!r:.60} is beyond any array's size or dimensions")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r:.60} are not two integers 0 <= begin <= end")
        if offsets[1] > data_size:
            raise CheckpointError(f"{where} runs past the end of the {data_size:,} data bytes (truncated?)")
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise CheckpointError(f"{where}: shape {shape} does not fit its {offsets[1] - offsets[0]:,} bytes")
        spans.append((offsets[0], offsets[1], name))
    _check_tiling(spans, data_size, path)
    return header, meta, 8 + header_len


def _check_tiling(spans, data_size, path):
    """The tensors' (begin, end, name) byte spans must tile the data region exactly, as the format
    requires: no gap, no overlap, nothing after the last one."""
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{path}: tensor {name!r} {'overlaps another' if begin < end else 'leaves a gap'} "
                                  f"at data byte {min(begin, end):,}")
        end = stop
    if end != data_size:
        raise CheckpointError(f"{path}: {data_size - end:,} bytes after the last tensor (corrupt file)")


def read_safetensors(path, with_metadata=False):
    """Read a .safetensors file into numpy arrays (memory-mapped views; BF16 becomes float32)."""
    path = Path(path)
    header, meta, start = read_safetensors_header(path)
    raw, tensors = _memmap(path), {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        array = raw[start + begin:start + end].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = _bfloat16_to_float32(array) if info["dtype"] == "BF16" else array
    return (tensors, meta) if with_metadata else tensors


def write_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> Path:
    """Write numpy arrays (and string metadata) as a safetensors file, atomically."""
    return cli.atomic_write(path, safetensors_writer(tensors, metadata))


def safetensors_writer(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """A function that writes the safetensors bytes of tensors to an open binary file."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}
    arrays = {name: np.ascontiguousarray(a).astype(np.dtype(a.dtype).newbyteorder("<"), copy=False)
              for name, a in tensors.items()}
    header, offset = {"__metadata__": dict(metadata)} if metadata else {}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": names[array.dtype.newbyteorder("=")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the spec allows space padding; it aligns the data to 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(blob)) + blob)
        for array in arrays.values():
            f.write(array.tobytes())
    return write
