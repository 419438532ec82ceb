"""GPT-2 in plain PyTorch, loaded straight from OpenAI's own checkpoint files.

This file holds the whole model and everything needed to fill it with OpenAI's weights:

  1. the model (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"):
     token + position embeddings, pre-norm transformer blocks, a final LayerNorm and an output
     head tied to the token embedding;
  2. a reader for TensorFlow's V2 checkpoint format (a LevelDB-style ``.index`` table plus a
     ``.data`` file of raw tensors) written from the format's public description, so that
     TensorFlow itself is never needed, and a reader for Hugging Face's ``model.safetensors``;
  3. a short, table-driven mapping from checkpoint names to module names;
  4. the GPT-2 byte-level BPE tokenizer, built from the folder's own files with tiktoken;
  5. a resumable download of the official files into a cache folder;
  6. a command line that continues a prompt, to check that the weights loaded right.

Usage:
    python gpt2.py "Every effort moves you" --max-new-tokens 25
    python gpt2.py --model-dir ./gpt2/124M "Hello"        # a local copy, no network
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True  # OpenAI's GPT-2 has biases on the query/key/value projections


GPT2_SIZES = {
    "124M": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),
    "355M": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "774M": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "1558M": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
}
SIZE_ALIASES = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def resolve_size(name: str) -> str:
    """Turn a size name or alias ("gpt2-small") into one of the keys of GPT2_SIZES."""
    size = SIZE_ALIASES.get(name, name)
    if size not in GPT2_SIZES:
        valid = ", ".join([*GPT2_SIZES, *SIZE_ALIASES])
        raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {valid}")
    return size


# ----------------------------------------------------------------------------------------------
# The model


class MultiHeadAttention(nn.Module):
    """Causal self-attention: softmax(Q K^T / sqrt(d_head) + causal mask) V, over n_heads heads."""

    def __init__(self, d_in, d_out, n_heads, dropout=0.0, qkv_bias=False):
        super().__init__()
        if d_out % n_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim, self.d_out = n_heads, d_out // n_heads, d_out
        self.dropout = dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x):
        B, T, _ = x.shape
        # (B, T, C) -> (B, n_heads, T, head_dim): each head attends on its own slice of C
        q = self.W_query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        # is_causal masks out future positions, so token t only sees tokens 0..t; that is also
        # why right padding never changes the outputs at real tokens
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side again: (B, T, C)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """Position-wise MLP: C -> 4C -> C with GELU (the tanh approximation GPT-2 was trained with)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + att(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            cfg.emb_dim, cfg.emb_dim, cfg.n_heads, dropout=cfg.drop_rate, qkv_bias=cfg.qkv_bias
        )
        self.ff = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: idx (B, T) int64 token ids -> logits (B, T, out_head.out_features)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # Embeddings are created empty and filled by init_weights: nn.Embedding's own init would call
        # normal_, which on the meta device costs a one-off 1.5 s import that load_gpt2 never needs.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim, _weight=torch.empty(cfg.vocab_size, cfg.emb_dim))
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim, _weight=torch.empty(cfg.context_length, cfg.emb_dim))
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # Weight tying, as in OpenAI's GPT-2: the output head reads logits off the token embedding
        # matrix (logits = h @ wte^T), so both are one tensor and counted once.
        self.out_head.weight = self.tok_emb.weight
        if not self.tok_emb.weight.is_meta:  # on the meta device there are no values to set
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2's initialisation for training from scratch: N(0, 0.02) weights, zero biases, and
        residual output projections scaled by 1/sqrt(2 n_layers) so the residual sum stays O(1)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("out_proj.weight", "layers.2.weight")) else 0.02
                p.normal_(0.0, std)

    def forward(self, idx):
        B, T = idx.shape
        if T > self.cfg.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.cfg.context_length})")
        pos = torch.arange(T, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, vocab_size)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None):
    """Append up to max_new_tokens tokens to idx (B, T). temperature 0 means greedy decoding."""
    context = model.pos_emb.num_embeddings
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context:])[:, -1, :]  # only the last position predicts: (B, V)
        if temperature == 0.0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
        idx = torch.cat([idx, next_id], dim=1)
    return idx


# ----------------------------------------------------------------------------------------------
# Reading TensorFlow V2 checkpoints without TensorFlow
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


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt, or does not fit the model."""


TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two BlockHandles of at most 10 + 10 bytes each, padded to 40, + 8-byte magic
BLOCK_TRAILER_SIZE = 5

# TensorFlow DataType enum values (tensorflow/core/framework/types.proto) that map onto numpy
TF_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}
TF_DTYPE_BFLOAT16 = 14


def _make_crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):  # Castagnoli polynomial, bit-reflected
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
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


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, as in protobuf
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _parse_proto(buf, where):
    """Decode a protobuf message into {field number: [values]} (ints, or bytes for messages)."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, where)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise CheckpointError(f"{where}: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointError(f"{where}: protobuf message is truncated")
        fields.setdefault(number, []).append(value)
    return fields


def _read_block(table: bytes, offset: int, size: int, where: str) -> bytes:
    """Return one block's contents after checking its bounds, compression type and checksum."""
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(table) - FOOTER_SIZE:
        raise CheckpointError(f"{where}: block at offset {offset:,} runs past the end (file truncated?)")
    contents = table[offset:offset + size]
    kind = table[offset + size]
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
    table = path.read_bytes()
    where = str(path)
    if len(table) < FOOTER_SIZE:
        raise CheckpointError(f"{where}: only {len(table)} bytes, too short for a checkpoint index")
    footer = table[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise CheckpointError(f"{where}: wrong magic number, not a TensorFlow checkpoint index")
    _, pos = _varint(footer, 0, where)  # metaindex handle: unused by checkpoints
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
        if state.exists():
            match = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"))
            if match:
                # the name may be absolute (as TensorFlow writes it) from another machine: use it
                # relative to this folder
                return path / Path(match.group(1)).name
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            raise CheckpointError(f"{path}: expected one *.index checkpoint file, found {len(indexes)}")
        return indexes[0].with_suffix("")
    if path.suffix == ".index":
        return path.with_suffix("")
    return path


def _as_array(raw: np.ndarray, offset: int, np_dtype, shape, where) -> np.ndarray:
    """View count elements of raw (uint8 memmap) at offset as np_dtype with shape; no copy."""
    itemsize = np.dtype(np_dtype).itemsize
    nbytes = math.prod(shape) * itemsize
    return raw[offset:offset + nbytes].view(np_dtype).reshape(shape)


def _bfloat16_to_float32(u16: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32, so shifting the bits back up is exact
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)
    # copy-on-write: the file stays untouched and the pages are read only when a tensor is used
    return np.memmap(path, dtype=np.uint8, mode="c")


def read_tf_checkpoint(path) -> dict[str, np.ndarray]:
    """Read every tensor of a TensorFlow V2 checkpoint as numpy arrays, names and shapes as stored.

    path: a folder holding the checkpoint, its prefix ("…/model.ckpt") or its .index file.
    The arrays are memory-mapped views of the data file. Sizes, offsets, dtypes and every block
    checksum of the index are checked; the per-tensor data checksums are not (a crc32c over half a
    gigabyte is too slow in pure Python), but a truncated data file is always caught.
    """
    prefix = _checkpoint_prefix(Path(path))
    index_path = prefix.with_name(prefix.name + ".index")
    if not index_path.exists():
        raise CheckpointError(f"checkpoint index {index_path} not found")
    entries = _read_table(index_path)
    if b"" not in entries:
        raise CheckpointError(f"{index_path}: no bundle header, not a TensorFlow V2 checkpoint")
    header = _parse_proto(entries.pop(b""), str(index_path))
    n_shards = header.get(1, [1])[0]
    if header.get(2, [0])[0] != 0:
        raise CheckpointError(f"{index_path}: big-endian checkpoints are not supported")
    shards = {}
    tensors = {}
    for key, value in entries.items():
        name = key.decode("utf-8", errors="replace")
        where = f"{index_path}: tensor {name!r}"
        entry = _parse_proto(value, where)
        dtype_id = entry.get(1, [0])[0]
        dims = [_parse_proto(d, where).get(1, [0])[0] for d in _parse_proto(entry.get(2, [b""])[0], where).get(2, [])]
        shard, offset, size = entry.get(3, [0])[0], entry.get(4, [0])[0], entry.get(5, [0])[0]
        if 7 in entry:
            raise CheckpointError(f"{where} is partitioned into slices, which is not supported")
        if dtype_id == TF_DTYPE_BFLOAT16:
            np_dtype = np.uint16
        elif dtype_id in TF_DTYPES:
            np_dtype = TF_DTYPES[dtype_id]
        else:
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
            raise CheckpointError(
                f"{data_path}: tensor {name!r} needs bytes {offset:,}..{offset + size:,} but the file "
                f"has {raw.size:,} (truncated? download it again)"
            )
        array = _as_array(raw, offset, np_dtype, dims, where)
        tensors[name] = _bfloat16_to_float32(array) if dtype_id == TF_DTYPE_BFLOAT16 else array
    return tensors


# ----------------------------------------------------------------------------------------------
# Reading safetensors: [8-byte little-endian header length N][N bytes of JSON header][raw data]
# header = {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": …}

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16,
}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Read a .safetensors file into numpy arrays (memory-mapped views; BF16 becomes float32)."""
    path = Path(path)
    raw = _memmap(path)
    if raw.size < 8:
        raise CheckpointError(f"{path}: too short for a safetensors file")
    header_len = int(raw[:8].view("<u8")[0])
    if header_len > raw.size - 8:
        raise CheckpointError(f"{path}: header length {header_len:,} exceeds the file (truncated?)")
    try:
        header = json.loads(bytes(raw[8:8 + header_len]))
    except ValueError:
        raise CheckpointError(f"{path}: header is not valid JSON, not a safetensors file") from None
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize or begin > end:
            raise CheckpointError(f"{path}: tensor {name!r}: shape {shape} does not fit its bytes")
        if data_start + end > raw.size:
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        array = _as_array(raw, data_start + begin, dtype, shape, path)
        tensors[name] = _bfloat16_to_float32(array) if info["dtype"] == "BF16" else array
    return tensors


# ----------------------------------------------------------------------------------------------
# Writers, the inverses of the readers above. The tests and bench.py use them to make model
# folders without TensorFlow or network. (The data checksums are left out, as in read_tf_checkpoint.)

_NP_TO_TF = {np.dtype(v): k for k, v in TF_DTYPES.items()}


def atomic_write(path, data: bytes | str):
    """Write data to path through a temporary name, so path is never left half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _table_block(items, restart_interval=16) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(prev)) and key[shared] == prev[shared]:
                shared += 1
        out += _encode_varint(shared) + _encode_varint(len(key) - shared) + _encode_varint(len(value))
        out += key[shared:] + value
        prev = key
    restarts = restarts or [0]
    out += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def _write_table(items, block_size=4096) -> bytes:
    """Lay out a sorted list of (key, value) pairs as a LevelDB-format table."""
    out, index = bytearray(), []

    def add_block(contents):
        handle = _encode_varint(len(out)) + _encode_varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", masked_crc32c(contents + b"\x00")))
        return handle

    block, size = [], 0
    for i, (key, value) in enumerate(items):
        block.append((key, value))
        size += len(key) + len(value)
        if size >= block_size or i == len(items) - 1:
            index.append((key, add_block(_table_block(block))))  # last key separates blocks
            block, size = [], 0
    metaindex = add_block(_table_block([]))
    index_handle = add_block(_table_block(index, restart_interval=1))
    footer = (metaindex + index_handle).ljust(40, b"\x00") + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out + footer)


def write_tf_checkpoint(tensors: dict[str, np.ndarray], prefix, block_size=4096):
    """Write tensors as a TensorFlow V2 checkpoint <prefix>.index + <prefix>.data-00000-of-00001."""
    prefix = Path(prefix)
    items, offset = [], 0
    data_path = prefix.with_name(prefix.name + ".data-00000-of-00001")
    tmp = data_path.with_name(data_path.name + ".tmp")
    with open(tmp, "wb") as f:
        for name in sorted(tensors):
            array = np.ascontiguousarray(tensors[name])
            shape = b"".join(b"\x12" + _encode_varint(len(d)) + d
                             for d in (b"\x08" + _encode_varint(n) for n in array.shape))
            entry = (b"\x08" + _encode_varint(_NP_TO_TF[array.dtype])
                     + b"\x12" + _encode_varint(len(shape)) + shape
                     + b"\x20" + _encode_varint(offset) + b"\x28" + _encode_varint(array.nbytes))
            items.append((name.encode(), entry))
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            offset += array.nbytes
    os.replace(tmp, data_path)
    header = b"\x08\x01" + b"\x1a\x02\x08\x01"  # num_shards = 1, version { producer: 1 }
    index = _write_table([(b"", header)] + items, block_size=block_size)
    atomic_write(prefix.with_name(prefix.name + ".index"), index)


def write_safetensors(tensors: dict[str, np.ndarray], path):
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the spec allows space padding; it aligns the data to 8 bytes
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
    os.replace(tmp, path)


def checkpoint_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an OpenAI GPT-2 checkpoint (names without "model/") and its shape."""
    V, T, C = cfg.vocab_size, cfg.context_length, cfg.emb_dim
    shapes = {"wte": (V, C), "wpe": (T, C), "ln_f/g": (C,), "ln_f/b": (C,)}
    block = {"ln_1/g": (C,), "ln_1/b": (C,), "attn/c_attn/w": (1, C, 3 * C), "attn/c_attn/b": (3 * C,),
             "attn/c_proj/w": (1, C, C), "attn/c_proj/b": (C,), "ln_2/g": (C,), "ln_2/b": (C,),
             "mlp/c_fc/w": (1, C, 4 * C), "mlp/c_fc/b": (4 * C,), "mlp/c_proj/w": (1, 4 * C, C),
             "mlp/c_proj/b": (C,)}
    for i in range(cfg.n_layers):
        shapes.update({f"h{i}/{name}": shape for name, shape in block.items()})
    return shapes


def write_model_folder(folder, cfg: GPTConfig, tensors: dict[str, np.ndarray], fmt="openai"):
    """Write a loadable model folder from tensors named as in checkpoint_shapes.

    fmt "openai": hparams.json + a TensorFlow checkpoint, as in OpenAI's release;
    fmt "hf": config.json + model.safetensors with Hugging Face's names and 2-D Conv1D weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "openai":
        hparams = {"n_vocab": cfg.vocab_size, "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim,
                   "n_head": cfg.n_heads, "n_layer": cfg.n_layers}
        write_tf_checkpoint({f"model/{k}": v for k, v in tensors.items()}, folder / "model.ckpt")
        atomic_write(folder / "checkpoint", 'model_checkpoint_path: "model.ckpt"\n')
        atomic_write(folder / "hparams.json", json.dumps(hparams, indent=2))
    elif fmt == "hf":
        config = {"vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
                  "n_head": cfg.n_heads, "n_layer": cfg.n_layers}
        hf = {}
        for name, array in tensors.items():  # "h3/ln_1/g" -> "h.3.ln_1.weight"
            hf_name = re.sub(r"^h(\d+)/", r"h.\1.", name).replace("/", ".")
            hf_name = re.sub(r"\.(g|w)$", ".weight", re.sub(r"\.b$", ".bias", hf_name))
            hf_name += ".weight" if name in ("wte", "wpe") else ""
            hf[hf_name] = array.reshape(array.shape[-2:]) if array.ndim == 3 else array
        write_safetensors(hf, folder / "model.safetensors")
        atomic_write(folder / "config.json", json.dumps(config, indent=2))
    else:
        raise ValueError(f"unknown folder format {fmt!r}; choose openai or hf")


# ----------------------------------------------------------------------------------------------
# From checkpoint names to module names
#
# Both checkpoint layouts are first turned into OpenAI's names without the "model/" scope
# (HF "h.0.attn.c_attn.weight" -> "h0/attn/c_attn/w"). OpenAI wrote its linear layers as Conv1D
# with weights (1, in, out); nn.Linear wants (out, in), hence the transpose, and c_attn packs the
# query, key and value projections side by side along "out", hence the three-way split.

TOP_TABLE = [
    ("wte", "tok_emb.weight", False),  # also the tied out_head.weight
    ("wpe", "pos_emb.weight", False),
    ("ln_f/g", "final_norm.weight", False),
    ("ln_f/b", "final_norm.bias", False),
]
BLOCK_TABLE = [  # (name under h{i}/, module name(s) under trf_blocks.{i}., is a Conv1D weight)
    ("ln_1/g", "norm1.weight", False),
    ("ln_1/b", "norm1.bias", False),
    ("attn/c_attn/w", ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight"), True),
    ("attn/c_attn/b", ("att.W_query.bias", "att.W_key.bias", "att.W_value.bias"), False),
    ("attn/c_proj/w", "att.out_proj.weight", True),
    ("attn/c_proj/b", "att.out_proj.bias", False),
    ("ln_2/g", "norm2.weight", False),
    ("ln_2/b", "norm2.bias", False),
    ("mlp/c_fc/w", "ff.layers.0.weight", True),
    ("mlp/c_fc/b", "ff.layers.0.bias", False),
    ("mlp/c_proj/w", "ff.layers.2.weight", True),
    ("mlp/c_proj/b", "ff.layers.2.bias", False),
]
# HF files also carry buffers (the causal mask) and the tied lm_head, which hold no new weights
HF_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|lm_head\.weight)$")


def weight_table(n_layers: int):
    """The full mapping for n_layers blocks: [(checkpoint name, module name(s), is_conv)]."""
    table = list(TOP_TABLE)
    for i in range(n_layers):
        for ckpt, module, conv in BLOCK_TABLE:
            if isinstance(module, tuple):
                module = tuple(f"trf_blocks.{i}.{m}" for m in module)
            else:
                module = f"trf_blocks.{i}.{module}"
            table.append((f"h{i}/{ckpt}", module, conv))
    return table


def _canonical_tensors(model_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """Read the folder's weights with OpenAI's names (no "model/" scope); also say which file."""
    if (model_dir / "checkpoint").exists() or list(model_dir.glob("*.index")):
        tensors = read_tf_checkpoint(model_dir)
        return {k.removeprefix("model/"): v for k, v in tensors.items()}, "TensorFlow checkpoint"
    if (model_dir / "model.safetensors").exists():
        tensors = read_safetensors(model_dir / "model.safetensors")
        out = {}
        for name, array in tensors.items():
            if not HF_IGNORED.search(name):
                out[_hf_to_openai(name)] = array
        return out, "model.safetensors"
    raise CheckpointError(
        f"{model_dir} holds no weights: expected OpenAI's checkpoint files (checkpoint, "
        "model.ckpt.index, model.ckpt.data-00000-of-00001) or a model.safetensors"
    )


def _hf_to_openai(name: str) -> str:
    # "h.3.ln_1.weight" -> "h3/ln_1/g", "h.3.mlp.c_fc.bias" -> "h3/mlp/c_fc/b", "wte.weight" -> "wte"
    name = name.removeprefix("transformer.")
    if name in ("wte.weight", "wpe.weight"):
        return name.removesuffix(".weight")
    name = re.sub(r"^h\.(\d+)\.", r"h\1/", name).replace(".", "/")
    is_norm = re.search(r"ln_(\d|f)/(weight|bias)$", name) is not None
    return re.sub(r"/weight$", "/g" if is_norm else "/w", re.sub(r"/bias$", "/b", name))


def read_config(model_dir) -> GPTConfig:
    """The model's shape from OpenAI's hparams.json (or, failing that, HF's config.json)."""
    model_dir = Path(model_dir)
    for file_name, keys in (("hparams.json", ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")),
                            ("config.json", ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"))):
        path = model_dir / file_name
        if path.exists():
            try:
                hp = json.loads(path.read_text())
                values = [int(hp[k]) for k in keys]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: not a valid GPT-2 {file_name} ({type(e).__name__}: {e})") from None
            vocab, ctx, emb, heads, layers = values
            if min(values) < 1 or emb % heads:
                raise CheckpointError(f"{path}: impossible shape {dict(zip(keys, values))}")
            return GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=emb, n_heads=heads, n_layers=layers)
    raise CheckpointError(f"{model_dir}: missing hparams.json (the model's shape)")


def _listing(names, limit=6):
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_gpt2(model_dir, device="cpu") -> GPTModel:
    """Build GPT-2 from a model folder (OpenAI's files or a model.safetensors), in eval mode.

    The model is built on the meta device, so no memory is allocated and no random initialisation
    is done, and then the checkpoint's tensors are assigned as the parameters (views of the
    memory-mapped file where the layout allows, so loading copies nothing on the CPU).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    cfg = read_config(model_dir)
    tensors, source = _canonical_tensors(model_dir)
    table = weight_table(cfg.n_layers)
    expected = {ckpt for ckpt, _, _ in table}
    missing, extra = expected - tensors.keys(), tensors.keys() - expected
    if missing or extra:
        parts = [f"missing {_listing(missing)}" if missing else "", f"unexpected {_listing(extra)}" if extra else ""]
        raise CheckpointError(
            f"{model_dir}: the {source} does not match hparams.json ({cfg.n_layers} layers): "
            + "; ".join(p for p in parts if p)
        )
    with torch.device("meta"):
        model = GPTModel(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = {}
    for ckpt, module, conv in table:
        t = torch.from_numpy(tensors[ckpt])
        if conv:
            t = t.reshape(t.shape[-2:]).T  # Conv1D (1, in, out) -> Linear (out, in), a view
        names = module if isinstance(module, tuple) else (module,)
        parts = t.chunk(len(names), dim=0) if t.dim() and t.shape[0] % len(names) == 0 else (t,)
        for name, part in zip(names, parts):
            if len(parts) != len(names) or tuple(part.shape) != shapes[name]:
                raise CheckpointError(
                    f"{model_dir}: tensor {ckpt} of shape {tuple(tensors[ckpt].shape)} does not fit "
                    f"{name} {shapes[name]} (hparams.json: n_embd={cfg.emb_dim}, n_vocab={cfg.vocab_size}, "
                    f"n_ctx={cfg.context_length})"
                )
            state[name] = part
    state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters: tie them again
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-level BPE, from the folder's encoder.json + vocab.bpe

# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, each with one leading space
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so that BPE files are plain text.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    given the characters from U+0100 on, in byte order (so a space is written "Ġ").
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tokenizer(model_dir) -> tiktoken.Encoding:
    """A tiktoken Encoding from encoder.json + vocab.bpe (or HF's vocab.json + merges.txt), offline."""
    model_dir = Path(model_dir)
    for vocab_name, merges_name in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (model_dir / vocab_name).exists() and (model_dir / merges_name).exists():
            break
    else:
        raise CheckpointError(f"{model_dir}: missing the tokenizer files encoder.json and vocab.bpe")
    try:
        encoder = json.loads((model_dir / vocab_name).read_text(encoding="utf-8"))
        merges = (model_dir / merges_name).read_text(encoding="utf-8").splitlines()
    except ValueError as e:
        raise CheckpointError(f"{model_dir / vocab_name}: not a GPT-2 tokenizer file ({e})") from None
    if ENDOFTEXT not in encoder:
        raise CheckpointError(f"{model_dir / vocab_name}: has no {ENDOFTEXT} token")
    alphabet = {ch: chr(b) for b, ch in bytes_to_unicode().items()}
    tokens = [token for token in encoder if token != ENDOFTEXT]
    stray = set("".join(tokens)) - alphabet.keys()
    if stray:
        raise CheckpointError(f"{model_dir / vocab_name}: character {min(stray)!r} is outside GPT-2's byte alphabet")
    # each character stands for one byte: map it back to chr(byte), then Latin-1 turns that into the byte.
    # tiktoken merges by rank, and GPT-2's ids are ranks: merge k of vocab.bpe is token 256 + k
    to_byte = str.maketrans(alphabet)
    ranks = {token.translate(to_byte).encode("latin-1"): encoder[token] for token in tokens}
    merges = [line for line in merges if line and not line.startswith("#version")]
    for k, line in enumerate(merges):
        first, _, second = line.partition(" ")
        if encoder.get(first + second) != 256 + k:
            raise CheckpointError(f"{model_dir / merges_name}: merge {k + 1} ({line!r}) disagrees with {vocab_name}")
    return tiktoken.Encoding(
        name=f"gpt2-{model_dir.name}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]},
    )


# ----------------------------------------------------------------------------------------------
# Download into a cache folder


class DownloadError(RuntimeError):
    """A file could not be fetched (no network, server error, or an incomplete transfer)."""


OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}"
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
HF_REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
            "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
CACHE_ENV = "GPT2_LORA_CACHE"


def default_cache_dir() -> Path:
    """$GPT2_LORA_CACHE, else $XDG_CACHE_HOME/gpt2-lora, else ~/.cache/gpt2-lora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gpt2-lora"


def download_file(url: str, dest, retries=3, timeout=(10, 60), backoff=2.0, progress=True) -> Path:
    """Stream url to dest through dest.part, resuming a partial file with an HTTP Range request.

    dest appears only once the whole file is there, with the size the server announced.
    """
    import requests  # here, not at the top: it adds 0.15 s to every start of predict.py, which never downloads

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * attempt)
        done = part.stat().st_size if part.exists() else 0
        try:
            headers = {"Range": f"bytes={done}-"} if done else {}
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416:  # the partial file is no prefix of this one: start over
                    part.unlink()
                    error = "the server refused to resume"
                    continue
                if r.status_code >= 400:
                    raise DownloadError(f"could not download {url}: HTTP {r.status_code} {r.reason}")
                if r.status_code == 206:  # Content-Range: bytes start-end/total
                    total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
                    mode = "ab"
                else:  # 200: the server sends the whole file, whatever we asked for
                    total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                    done, mode = 0, "wb"
                started, shown, start_bytes = time.monotonic(), 0.0, done
                with open(part, mode) as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        now = time.monotonic()
                        if progress and (now - shown > 0.5 or done == total):
                            shown = now
                            rate = (done - start_bytes) / 1e6 / max(now - started, 1e-6)
                            of_total = f" / {total / 1e6:,.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
                            print(f"\r  {dest.name}: {done / 1e6:,.1f}{of_total} {rate:.1f} MB/s",
                                  end="", file=sys.stderr, flush=True)
                if progress:
                    print(file=sys.stderr)
            if total is not None and part.stat().st_size != total:
                error = f"got {part.stat().st_size:,} of {total:,} bytes"
                continue
            os.replace(part, dest)
            return dest
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            error = type(e).__name__
    raise DownloadError(f"could not download {url} after {retries} tries ({error})")


def download_gpt2(size="124M", cache_dir=None, source="openai", files=None) -> Path:
    """Fetch one GPT-2 size into the cache (once) and return its folder.

    source "openai": OpenAI's seven release files (a TensorFlow checkpoint);
    source "hf": the same weights as model.safetensors from the Hugging Face hub.
    files: only these of the folder's files (e.g. the tokenizer's), default all.
    """
    size = resolve_size(size)
    if source not in ("openai", "hf"):
        raise ValueError(f"unknown weights source {source!r}; choose openai or hf")
    folder = Path(cache_dir or default_cache_dir()) / ("gpt2" if source == "openai" else "gpt2-hf") / size
    all_files = OPENAI_FILES if source == "openai" else HF_FILES
    for name in files or all_files:
        if (folder / name).exists():  # a file only gets its final name once it is complete
            continue
        url = (OPENAI_URL.format(size=size, file=name) if source == "openai"
               else HF_URL.format(repo=HF_REPOS[size], file=name))
        try:
            download_file(url, folder / name)
        except DownloadError as e:
            raise DownloadError(
                f"{e}. Without internet, point --model-dir at a local copy of the model folder "
                f"({', '.join(all_files)})"
            ) from None
    return folder


def load_model_and_tokenizer(folder, device="cpu") -> tuple[GPTModel, tiktoken.Encoding]:
    """load_gpt2 and load_tokenizer of one folder, checked to fit each other."""
    tokenizer = load_tokenizer(folder)
    model = load_gpt2(folder, device=device)
    if tokenizer.n_vocab > model.cfg.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.n_vocab:,} tokens but the model only "
                              f"{model.cfg.vocab_size:,}; the BPE files belong to another model")
    return model, tokenizer


def model_folder(size="124M", model_dir=None, cache_dir=None, source="openai") -> Path:
    """The folder to load: model_dir when given (no network), else the cached download."""
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise CheckpointError(f"model folder {model_dir} does not exist; check --model-dir")
        return Path(model_dir)
    return download_gpt2(size, cache_dir=cache_dir, source=source)


# ----------------------------------------------------------------------------------------------
# Command-line helpers shared by the scripts


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: …)" unless there is no default to show or the help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (exit code 2)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=_HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def pick_device(name="auto") -> torch.device:
    """auto: CUDA if present, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def add_model_args(parser):
    parser.add_argument("--model", default="124M",
                        help="GPT-2 size: 124M, 355M, 774M, 1558M (or gpt2-small, -medium, -large, -xl)")
    parser.add_argument("--model-dir", default=None,
                        help="a local model folder (OpenAI's files or a model.safetensors); no download")
    parser.add_argument("--weights-source", choices=("openai", "hf"), default="openai",
                        help="where to download from: OpenAI's TensorFlow files or Hugging Face's safetensors")
    parser.add_argument("--cache-dir", default=None,
                        help=f"download cache (default: ${CACHE_ENV}, else $XDG_CACHE_HOME/gpt2-lora "
                             "or ~/.cache/gpt2-lora)")


def main(argv=None):
    parser = ArgumentParser(prog="gpt2.py", description="Continue a prompt with GPT-2 (a check that the weights load right).")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=25, help="how many tokens to add")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=123, help="random seed for sampling")
    add_model_args(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error('the prompt is empty; give some text, e.g. python gpt2.py "Every effort moves you"')
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be 0 (greedy) or more")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be at least 1")
    try:
        size = resolve_size(args.model)
        device = pick_device(args.device)
        folder = model_folder(size, args.model_dir, args.cache_dir, args.weights_source)
        model, tokenizer = load_model_and_tokenizer(folder, device=device)
    except (ValueError, OSError, DownloadError) as e:
        parser.exit(2, f"gpt2.py: error: {e}\n")
    ids = tokenizer.encode_ordinary(args.prompt)
    context = model.cfg.context_length
    if len(ids) > context:
        print(f"note: the prompt has {len(ids):,} tokens; keeping the last {context:,}", file=sys.stderr)
        ids = ids[-context:]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=device), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k,
                   eos_id=tokenizer.eot_token, generator=generator)
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("gpt2.py: interrupted")
