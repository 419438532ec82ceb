"""GPT-2 in plain PyTorch, loaded straight from OpenAI's own checkpoint files.

Read it from the top: the configuration, the model (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"), GPT-2 as a classifier, loading OpenAI's weights through a short
name table, the BPE tokenizer, the verified download, the command-line conventions the scripts
share, this file's own command line (continue a prompt), and, as an appendix, the two file formats read without their libraries: TensorFlow's V2 checkpoint
(a LevelDB table of protobuf entries plus raw data) and Hugging Face's safetensors.

Usage:
    python gpt2.py "Every effort moves you" --max-new-tokens 25
    python gpt2.py --model-dir ./gpt2/124M "Hello"        # a local copy, no network
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # Ctrl-C while torch imports (about 2 s) ends in one line, not a traceback
    import os
    import signal
    # os._exit, not sys.exit: the imports of numpy and torch swallow a SystemExit raised inside them
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("gpt2.py: interrupted\n"), sys.stderr.flush(), os._exit(130)))

import argparse
import contextlib
import functools
import hashlib
import json
import math
import mmap
import os
import re
import secrets
import signal
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------------------------
# 1. Configuration, and the two ways loading can fail


class CheckpointError(ValueError):
    """A model file that is missing, truncated, corrupt, or does not fit the model."""


class DownloadError(RuntimeError):
    """A file could not be fetched (no network, server error, an incomplete or corrupt transfer)."""



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
# What a config file may ask for, checked before anything is allocated: generous for GPT-2-like
# models, but a typo such as n_layer 2000000000 must not allocate until the machine dies.
CONFIG_BOUNDS = {"vocab_size": 1_000_000, "context_length": 65_536, "emb_dim": 16_384,
                 "n_heads": 1_024, "n_layers": 1_024}
CONFIG_FIELDS = tuple(CONFIG_BOUNDS)  # the GPTConfig fields a config file sets, in CONFIG_FILES' order


def resolve_size(name: str) -> str:
    """Turn a size name or alias ("gpt2-small") into one of the keys of GPT2_SIZES."""
    size = SIZE_ALIASES.get(name, name)
    if size not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join([*GPT2_SIZES, *SIZE_ALIASES])}")
    return size


def check_config(values: dict, where: str) -> GPTConfig:
    """A GPTConfig from {field: value}, each a true int within CONFIG_BOUNDS (not a bool or 32.7)."""
    for key, value in values.items():
        if type(value) is not int or not 1 <= value <= CONFIG_BOUNDS[key]:
            raise CheckpointError(f"{where}: {key} is {value!r}; expected a whole number from 1 to "
                                  f"{CONFIG_BOUNDS[key]:,}")
    if values["emb_dim"] % values["n_heads"]:
        raise CheckpointError(f"{where}: emb_dim {values['emb_dim']} is not divisible by n_heads {values['n_heads']}")
    return GPTConfig(**values)


# ----------------------------------------------------------------------------------------------
# 2. The model


WRITTEN_OUT_MAX_T = 256  # see MultiHeadAttention.forward


class MultiHeadAttention(nn.Module):
    """Causal self-attention over n_heads heads, each of size d_head = d_out / n_heads:

        Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V,   M[t, s] = -inf for s > t

    (Vaswani et al. 2017, eq. 1, with GPT's causal mask M so that token t sees only tokens 0..t.)
    """

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
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and T <= WRITTEN_OUT_MAX_T:
            # With gradients on (training) in bf16 on a CPU, PyTorch's fused kernel has a slow backward
            # pass: written out, attention's forward + backward runs 2.5-4x faster at SMS lengths
            # and about as fast at 256 tokens (bench.py's attention rows measure it).
            y = causal_attention(q, k, v, dropout)
        else:  # the same equation in one fused kernel, which (without dropout) stores no (T, T) weights
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side again: (B, T, C)
        return self.out_proj(y)


def causal_attention(q, k, v, dropout=0.0):
    """softmax(Q K^T / sqrt(d_head) + M) V, written out, for q, k, v of shape (B, H, T, d_head);
    dropout on the attention weights with that probability (pass 0 when not training)."""
    T = q.shape[-2]
    # (B, H, T, T): how much token t attends to token s. In bf16 these scores are rounded to 8
    # significant bits before the softmax, as in any bf16 matmul (the fused kernel keeps them in
    # float32), so the two forms agree to bf16 rounding; the softmax itself sums in float32.
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # M = -inf where s > t
    # The mask is also why right padding never changes the outputs at real tokens.
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return F.dropout(weights, dropout) @ v  # (B, H, T, d_head)


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
    """GPT-2: idx (B, T) int64 token ids -> logits (B, T, out_head.out_features).

    Set gradient_checkpointing = True to train big models in less memory (see forward)."""

    gradient_checkpointing = False

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
        for block in self.trf_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Keep only the block's input, and run the block again in the backward pass (Chen et
                # al. 2016): up to half again the compute (the frozen weights' backward costs about one
                # forward), but the saved activations of one block at a time, not of all of them.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, vocab_size), or (B, T, num_classes) with a classification head


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None):
    """Append up to max_new_tokens tokens to idx (B, T). temperature 0 means greedy decoding."""
    context = model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context:])[:, -1, :].float()  # only the last position predicts: (B, V)
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
# 3. GPT-2 as a classifier


def add_classification_head(model: GPTModel, num_classes: int):
    """Replace the 50,257-way LM head by a fresh, trainable (and no longer tied) num_classes-way one."""
    # A new module unties out_head from tok_emb; a fresh nn.Linear is trainable and float32, whatever
    # the frozen model's dtype, so the head trains in full precision.
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, device=model.tok_emb.weight.device)


def logits_at_last_token(model, input_ids, last_index):
    """Class logits (B, num_classes), float32, read at each message's last real token."""
    logits = model(input_ids)  # (B, T, num_classes)
    # Only the last real token has attended to the whole message (attention is causal); positions
    # after it are padding. Row b takes position last_index[b]: (B, T, K) -> (B, K).
    return logits[torch.arange(len(last_index), device=logits.device), last_index].float()


# ----------------------------------------------------------------------------------------------
# 4. Loading OpenAI's weights
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
# The two config files and their names for (vocab_size, context_length, emb_dim, n_heads, n_layers)
CONFIG_FILES = {"hparams.json": ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"),
                "config.json": ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")}
# HF files also carry buffers (the causal mask) and the tied lm_head, which hold no new weights
HF_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|lm_head\.weight)$")


def weight_table(n_layers: int):
    """The full mapping for n_layers blocks: [(checkpoint name, module name(s), is_conv)]."""
    table = [(ckpt, (module,), conv) for ckpt, module, conv in TOP_TABLE]
    for i in range(n_layers):
        for ckpt, module, conv in BLOCK_TABLE:
            names = module if isinstance(module, tuple) else (module,)
            table.append((f"h{i}/{ckpt}", tuple(f"trf_blocks.{i}.{m}" for m in names), conv))
    return table


def read_config(model_dir) -> GPTConfig:
    """The model's shape from OpenAI's hparams.json (or, failing that, HF's config.json)."""
    model_dir = Path(model_dir)
    for file_name, keys in CONFIG_FILES.items():
        path = model_dir / file_name
        if path.exists():
            try:
                hp = json.loads(path.read_bytes())
                values = {field: hp[key] for field, key in zip(CONFIG_FIELDS, keys)}
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{path}: not a GPT-2 {file_name} ({type(e).__name__}: {e}); "
                                      "restore the file that came with the weights") from None
            return check_config(values, str(path))
    raise CheckpointError(f"{model_dir}: missing hparams.json (or Hugging Face's config.json), the model's shape")


def read_checkpoint(model_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """The folder's weights with OpenAI's names (no "model/" scope), and which file they came from."""
    if (model_dir / "checkpoint").exists() or list(model_dir.glob("*.index")):
        tensors = read_tf_checkpoint(model_dir)
        return {k.removeprefix("model/"): v for k, v in tensors.items()}, "TensorFlow checkpoint"
    if (model_dir / "model.safetensors").exists():
        tensors = read_safetensors(model_dir / "model.safetensors")
        return {_hf_to_openai(k): v for k, v in tensors.items() if not HF_IGNORED.search(k)}, "model.safetensors"
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


def load_gpt2(model_dir, device="cpu", dtype=torch.float32) -> GPTModel:
    """Build GPT-2 from a model folder (OpenAI's files or a model.safetensors), in eval mode.

    Built on the meta device (no memory, no random init), then the checkpoint's tensors become its
    parameters: float32 ones as views of the memory-mapped file, so loading copies nothing. dtype is
    that of the big matrices (see cast_matmuls); bfloat16 ones are cast once, here, tensor by tensor,
    and the residual stream stays float32."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist; check --model-dir")
    cfg = read_config(model_dir)
    tensors, source = read_checkpoint(model_dir)
    table = weight_table(cfg.n_layers)
    _check_names({c for c, _, _ in table}, tensors.keys(), f"{model_dir}: the {source}", cfg.n_layers)
    with torch.device("meta"):
        model = GPTModel(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = {}
    for ckpt, names, conv in table:
        if tensors[ckpt].dtype.kind != "f":
            raise CheckpointError(f"{model_dir}: tensor {ckpt} holds {tensors[ckpt].dtype}, not floating-point weights")
        t = torch.from_numpy(tensors[ckpt])
        if conv and t.dim() in (2, 3) and t.shape[:-2].numel() == 1:
            # Conv1D (1, in, out), or HF's (in, out) -> Linear (out, in), a view; other shapes fail below
            t = t.reshape(t.shape[-2:]).T
        parts = t.chunk(len(names), dim=0) if t.dim() and t.shape[0] % len(names) == 0 else (t,)
        for name, part in zip(names, parts):
            if len(parts) != len(names) or tuple(part.shape) != shapes[name]:
                raise CheckpointError(
                    f"{model_dir}: tensor {ckpt} of shape {tuple(tensors[ckpt].shape)} does not fit {name} "
                    f"{shapes[name]} (config: n_embd={cfg.emb_dim}, n_vocab={cfg.vocab_size}, n_ctx={cfg.context_length})")
            if dtype == torch.float32:
                state[name] = part.float()  # a view of the file when it holds float32: no copy
            else:  # c_attn, c_proj, c_fc (the matmuls) and wte in dtype (see cast_matmuls); copies, so
                # that no float32 matrix stays alive, and the file's pages are let go at once
                state[name] = part.to(dtype if "/c_" in ckpt or ckpt == "wte" else torch.float32, copy=True)
        if dtype != torch.float32:
            _drop_pages(tensors[ckpt])
    state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters: tie them again
    return model.to(device).eval()


def _check_names(expected: set, found, where: str, n_layers: int):
    """The checkpoint must hold exactly the table's names: none missing, none left over."""
    missing, extra = expected - set(found), set(found) - expected
    if missing or extra:
        parts = [f"missing {listing(missing)}" if missing else "", f"unexpected {listing(extra)}" if extra else ""]
        raise CheckpointError(f"{where} does not match its config ({n_layers} layers): "
                              + "; ".join(p for p in parts if p))


def _drop_pages(array: np.ndarray):
    """Let the kernel drop the file pages behind a memory-mapped array once a copy of it is made:
    otherwise the float32 file (498 MB for 124M) would count in memory until loading ends."""
    mapping = getattr(array, "_mmap", None)  # np.memmap's own mmap object (and its views')
    if mapping is None or array.size == 0 or not hasattr(mapping, "madvise"):
        return
    offset = array.ctypes.data - np.frombuffer(mapping, np.uint8).ctypes.data
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, offset + array.nbytes - start)  # read-only use: pages reload if touched


def cast_matmuls(model: nn.Module, dtype) -> nn.Module:
    """Cast the big matrices to dtype, in place: the blocks' Linear layers (all the matmuls) and the
    token embedding. Position embeddings and LayerNorms stay float32, and so does the residual
    stream (a bf16 token embedding plus a float32 position embedding is float32)."""
    for module in [*model.trf_blocks.modules(), model.tok_emb]:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.to(dtype)
    return model


def load_model_and_tokenizer(folder, device="cpu", dtype=torch.float32) -> tuple[GPTModel, tiktoken.Encoding]:
    """load_gpt2 and load_tokenizer of one folder, checked to fit each other."""
    tokenizer = load_tokenizer(folder)
    model = load_gpt2(folder, device=device, dtype=dtype)
    if tokenizer.n_vocab > model.cfg.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.n_vocab:,} tokens but the model only "
                              f"{model.cfg.vocab_size:,}; the BPE files belong to another model")
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# 5. Tokenizer: GPT-2's byte-level BPE, from the folder's encoder.json + vocab.bpe

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
        if (model_dir / vocab_name).is_file() and (model_dir / merges_name).is_file():
            break
    else:
        raise CheckpointError(f"{model_dir}: missing the tokenizer files encoder.json and vocab.bpe "
                              "(or Hugging Face's vocab.json and merges.txt)")
    try:
        encoder = json.loads((model_dir / vocab_name).read_text(encoding="utf-8"))
        merges = (model_dir / merges_name).read_text(encoding="utf-8").split("\n")
        if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
            raise ValueError("expected a JSON object of token -> id")
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{model_dir / vocab_name}: not a GPT-2 tokenizer file ({str(e)[:100]})") from None
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
    merges = [line.removesuffix("\r") for line in merges if line and not line.startswith("#version")]
    for k, line in enumerate(merges):
        first, _, second = line.partition(" ")
        if encoder.get(first + second) != 256 + k:
            raise CheckpointError(f"{model_dir / merges_name}: merge {k + 1} ({line!r}) disagrees with {vocab_name}")
    try:
        return tiktoken.Encoding(name=f"gpt2-{model_dir.name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]})
    except ValueError as e:  # e.g. two tokens with one id
        raise CheckpointError(f"{model_dir / vocab_name}: not a consistent vocabulary ({str(e)[:100]})") from None


# ----------------------------------------------------------------------------------------------
# 6. Download into a cache folder, every file verified before it gets its final name


OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}"
# The index comes before the data file, whose tensors are checked against its CRCs. The loader never
# reads model.ckpt.meta (TensorFlow's graph), so it is not fetched.
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.index",
                "model.ckpt.data-00000-of-00001", "vocab.bpe")
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
HF_REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
            "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
# sha256 of files whose bytes are known (the BPE files are the same for every size; see README)
KNOWN_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "124M/checkpoint": "dd1b025d2e155283f5e300ce95bf6d5b6bc0f7fe010db73daa6975eb896ab9cb",
    "124M/hparams.json": "097db6ed93a3d9b8a32532fca9e564c703bed00c73908ecc49d1b05db2199606",
    "124M/model.ckpt.index": "71916f763f9746f9b2a06b12d91996cf1084ae008d0424543d39391c5f2dc687",
}
CACHE_ENV = "GPT2_LORA_CACHE"


def default_cache_dir() -> Path:
    """$GPT2_LORA_CACHE, else $XDG_CACHE_HOME/gpt2-lora, else ~/.cache/gpt2-lora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gpt2-lora"


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _announced_sha256(response) -> str | None:
    """The sha256 that the Hugging Face hub announces for a large (LFS) file, if it does."""
    for r in (*response.history, response):  # the hub says it on the first answer, before redirecting
        etag = r.headers.get("X-Linked-Etag", "").strip('"').removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return etag
    return None


def _fetch(url, part: Path, timeout, progress) -> tuple[int | None, str | None]:
    """Append url's bytes to part (resuming with a Range request); return (total size or None,
    announced sha256 or None). Raises DownloadError when the server refuses."""
    import requests  # here, not at the top: it adds 0.15 s to every start of predict.py, which never downloads

    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # the partial file is no prefix of this one: start over
            part.unlink()
            raise requests.ConnectionError("the server refused to resume")
        if r.status_code >= 400:
            raise DownloadError(f"could not download {url}: HTTP {r.status_code} {r.reason}")
        if r.status_code == 206:  # Content-Range: bytes start-end/total
            total, mode = int(r.headers["Content-Range"].rsplit("/", 1)[1]), "ab"
        else:  # 200: the server sends the whole file, whatever we asked for
            length = r.headers.get("Content-Length")
            total, done, mode = (int(length) if length else None), 0, "wb"
        started, shown, start_bytes = time.monotonic(), 0.0, done
        with open(part, mode) as f:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                done += len(chunk)
                now = time.monotonic()
                if progress and (now - shown > 0.5 or done == total):
                    shown, rate = now, (done - start_bytes) / 1e6 / max(now - started, 1e-6)
                    of_total = f" / {total / 1e6:,.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
                    print(f"\r  {part.name.removesuffix('.part')}: {done / 1e6:,.1f}{of_total} {rate:.1f} MB/s",
                          end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        chunked = "chunked" in r.headers.get("Transfer-Encoding", "")  # requests raises on a cut chunked body
        return (total if total is not None or not chunked else part.stat().st_size), _announced_sha256(r)


def download_file(url: str, dest, sha256=None, check=None, retries=3, timeout=(10, 60), backoff=2.0,
                  progress=True) -> Path:
    """Stream url to dest through dest.part, resuming a partial file; verify; then rename into place.

    dest appears only once the whole file is there: with the size the server announced, the sha256
    given (or announced by the hub), and passing check(path) (which raises ValueError when the bytes
    are wrong). A transfer whose end cannot be known (no Content-Length) must be checked by sha256.
    """
    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, error = dest.with_name(dest.name + ".part"), None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * attempt)
        try:
            total, announced = _fetch(url, part, timeout, progress)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            error = str(e) if "refused to resume" in str(e) else type(e).__name__
            continue
        size, expected = part.stat().st_size, sha256 or announced
        if total is not None and size != total:
            error = f"got {size:,} of {total:,} bytes"
            continue
        try:
            if total is None and expected is None and check is None:
                raise ValueError("the server did not say how long the file is, so a cut transfer cannot be told apart")
            if expected and sha256_of(part) != expected:
                raise ValueError(f"its sha256 is not the expected {expected[:16]}…")
            if check:
                check(part)
        except ValueError as e:
            part.unlink(missing_ok=True)  # never resume from bad bytes
            raise DownloadError(f"{url} arrived corrupt ({e}); nothing was kept: run the command again") from None
        os.replace(part, dest)
        return dest
    raise DownloadError(f"could not download {url} after {retries} tries ({error})")


def download_gpt2(size="124M", cache_dir=None, source="openai", files=None) -> Path:
    """Fetch one GPT-2 size into the cache (once) and return its folder.

    source "openai": OpenAI's release files (a TensorFlow checkpoint, each tensor checked against the
    CRC-32C in its index); source "hf": the same weights as model.safetensors from the Hugging Face
    hub (checked against the sha256 the hub announces). files: only these of the folder's files.
    """
    size = resolve_size(size)
    if source not in ("openai", "hf"):
        raise ValueError(f"unknown weights source {source!r}; choose openai or hf")
    folder = Path(cache_dir or default_cache_dir()) / ("gpt2" if source == "openai" else "gpt2-hf") / size
    all_files = OPENAI_FILES if source == "openai" else HF_FILES
    for name in files or all_files:
        if (folder / name).exists():  # a file only gets its final name once it is complete and checked
            continue
        url = OPENAI_URL.format(size=size, file=name) if source == "openai" else HF_URL.format(repo=HF_REPOS[size], file=name)
        check = None
        if name.startswith("model.ckpt.data"):
            check = lambda part: verify_tf_data(folder / "model.ckpt.index", part)  # noqa: E731
        try:
            download_file(url, folder / name, sha256=KNOWN_SHA256.get(name) or KNOWN_SHA256.get(f"{size}/{name}"),
                          check=check)
        except DownloadError as e:
            raise DownloadError(f"{e}. Without internet, point --model-dir at a local copy of the model folder "
                                f"({', '.join(all_files)})") from None
    return folder


def model_folder(size="124M", model_dir=None, cache_dir=None, source="openai") -> Path:
    """The folder to load: model_dir when given (no network), else the cached download."""
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise CheckpointError(f"model folder {model_dir} does not exist or is not a folder; check --model-dir")
        return Path(model_dir)
    return download_gpt2(size, cache_dir=cache_dir, source=source)


# ----------------------------------------------------------------------------------------------
# 7. Conventions the command-line scripts share: errors, Ctrl-C, devices, precision, safe writes


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
        fail(self.prog, f"{message} (see --help)")


def fail(prog: str, message) -> None:
    """The one way a script stops on bad input: one line on stderr, exit code 2."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"{prog}: error: {text}\n")
    sys.exit(2)


def run_cli(main, prog: str, expected=(), interrupted="interrupted",
            memory_tip="try a smaller --batch-size or model"):
    """Run main(); Ctrl-C ends in one line and exit code 130 (the shell's "stopped by SIGINT"),
    the expected errors and running out of memory in one line and exit code 2, a closed output
    pipe quietly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on Ctrl-C raises KeyboardInterrupt
    try:
        main()
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: {interrupted}\n")
        sys.exit(130)
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (ValueError, OSError, DownloadError, *expected) as e:  # first: DownloadError is a RuntimeError
        fail(prog, e)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(e):
            raise  # not the CPU allocator's "can't allocate memory": a bug, keep its traceback
        fail(prog, f"out of memory ({str(e)[:80]}); {memory_tip}")


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C back while the block runs (e.g. renames that must happen together); the list it
    yields is non-empty afterwards when a Ctrl-C came meanwhile, for the caller to act on."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names + (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])


def pick_device(name="auto") -> torch.device:
    """auto: CUDA if present, then Apple's MPS, then the CPU; any other name must be usable here."""
    usable = available_devices()
    if name == "auto":
        return torch.device("cuda" if "cuda:0" in usable else "mps" if "mps" in usable else "cpu")
    try:
        device = torch.device(name)
        key = device.type if device.type in ("cpu", "mps") else f"{device.type}:{device.index or 0}"
    except (RuntimeError, ValueError):
        key = None
    if key not in usable:
        raise ValueError(f"device {name!r} cannot be used by this torch; available: {', '.join(['auto', *usable])}")
    return device


BF16_MIN_SPEEDUP = 1.5  # on a CPU, bf16 only where a matmul measures at least this much faster
PRECISION_HELP = ("auto (CUDA: bf16 where the GPU supports it; CPU: bf16 only where a short probe measures a bf16 "
                  f"matmul at least {BF16_MIN_SPEEDUP}x faster than fp32; otherwise fp32), bf16 or fp32")


def bf16_speedup(device, m=256, k=768, n=3072, runs=3) -> float:
    """How many times faster a bf16 (m, k) @ (k, n) matmul runs than a float32 one: model-like
    shapes, best of runs after a warm-up (noise only ever slows a run). About 0.1 s on a CPU."""
    generator = torch.Generator(device).manual_seed(0)  # its own: the probe never moves the global seed

    def best(dtype):
        a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
        times = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            (a @ b).sum().item()  # .item() waits for the device to finish
            times.append(time.perf_counter() - start)
        return min(times[1:])
    return best(torch.float32) / best(torch.bfloat16)


def choose_precision(requested: str, device: torch.device, speedup=bf16_speedup) -> tuple[str, str]:
    """("fp32" or "bf16", why). auto: bf16 on a GPU that has it; on a CPU only where a short
    measurement shows bf16 at least BF16_MIN_SPEEDUP times faster (some CPUs run it 4-5x faster, others
    2x slower)."""
    if requested in ("fp32", "bf16"):
        return requested, "as asked"
    if device.type == "cuda":
        return ("bf16", "this GPU supports it") if torch.cuda.is_bf16_supported() else ("fp32", "this GPU lacks bf16")
    if device.type != "cpu":
        return "fp32", f"bf16 is not measured on {device.type}"
    ratio = speedup(device)
    if ratio >= BF16_MIN_SPEEDUP:
        return "bf16", f"a bf16 matmul runs {ratio:.1f}x faster than fp32 here"
    return "fp32", f"a bf16 matmul runs only {ratio:.2f}x as fast as fp32 here"


def autocast_for(device: torch.device, precision: str):
    """bf16: matmuls in bfloat16 (the float32 LoRA and head weights are cast on the fly, their
    master copies and AdamW's state stay float32); fp32: nothing changes."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def listing(names, limit=6) -> str:
    """"a, b, c and 4 more": a short, sorted list of names for an error message."""
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def atomic_write(path, data) -> Path:
    """Write data (bytes, str, or a function that writes to a binary file) to path through a
    temporary file of a unique name, then rename it into place: path is never half-written, two
    writers never mix, and on any error nothing is replaced and no temporary file is left."""
    return atomic_write_all({path: data})[0]


def atomic_write_all(files: dict) -> list[Path]:
    """atomic_write for several files that belong together: every one is written in full first
    (so a full disk or a denied permission replaces none of them), then all are renamed in order."""
    temps = {Path(p): Path(p).with_name(f".{Path(p).name}.{os.getpid()}.{secrets.token_hex(4)}.tmp") for p in files}
    try:
        for (path, tmp), data in zip(temps.items(), files.values()):
            with open(tmp, "xb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode() if isinstance(data, str) else data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return list(temps)


# ----------------------------------------------------------------------------------------------
# 8. This file's own command line: continue a prompt


def main(argv=None):
    run_cli(lambda: generate_cli(argv), "gpt2.py")


def generate_cli(argv):
    parser = ArgumentParser(prog="gpt2.py", description="Continue a prompt with GPT-2 (a check that the weights load right).")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=25, help="how many tokens to add")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=123, help="random seed for sampling")
    add_model_args(parser)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error('the prompt is empty; give some text, e.g. python gpt2.py "Every effort moves you"')
    if not 1 <= args.max_new_tokens <= 100_000:
        parser.error("--max-new-tokens must be between 1 and 100,000")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error("--temperature must be 0 (greedy) or a finite number above 0")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if not 0 <= args.seed < 2**63:
        parser.error("--seed must be between 0 and 2**63 - 1")
    size = resolve_size(args.model)
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(model_folder(size, args.model_dir, args.cache_dir,
                                                             args.weights_source), device=device)
    ids = tokenizer.encode_ordinary(args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    context = model.cfg.context_length
    if len(ids) > context:
        print(f"note: the prompt has {len(ids):,} tokens; keeping the last {context:,}", file=sys.stderr)
        ids = ids[-context:]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=device), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, eos_id=tokenizer.eot_token, generator=generator)
    print(tokenizer.decode(out[0].tolist()))


# ----------------------------------------------------------------------------------------------
# Appendix A. TensorFlow V2 checkpoints, read without TensorFlow
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


# ----------------------------------------------------------------------------------------------
# Appendix B. safetensors: [8-byte little-endian header length N][N bytes of JSON header][data]
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
            raise CheckpointError(f"{path}: the header is not valid JSON ({str(e)[:80]}); not a safetensors file") from None
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
    return atomic_write(path, safetensors_writer(tensors, metadata))


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


if __name__ == "__main__":
    main()
