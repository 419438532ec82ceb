"""GPT-2 in plain PyTorch, loaded straight from OpenAI's own checkpoint files.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners". Read it from the top:
the configuration, the model, GPT-2 as a classifier, loading OpenAI's weights through a short name
table, the BPE tokenizer, GPT-2's download, and this file's own command line (continue a prompt).
The two file formats (TensorFlow's checkpoint, safetensors) are read in formats.py; the
conventions every command shares (errors, stop signals, safe writes, devices) live in cli.py.

Usage:
    python gpt2.py "Every effort moves you" --max-new-tokens 25
    python gpt2.py --model-dir ./gpt2/124M "Hello"        # a local copy, no network
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.exit_on_signals_while_importing("gpt2.py")  # torch takes about 2 s to import

import hashlib
import json
import math
import mmap
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import formats
from formats import CheckpointError

# ----------------------------------------------------------------------------------------------
# 1. Configuration


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


# ----------------------------------------------------------------------------------------------
# 2. The model


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
        if _written_out_is_faster(q):
            y = causal_attention(q, k, v, dropout)
        else:  # the same equation in one fused kernel, which (without dropout) stores no (T, T) weights
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side again: (B, T, C)
        return self.out_proj(y)


def causal_attention(q, k, v, dropout=0.0):
    """softmax(Q K^T / sqrt(d_head) + M) V, written out, for q, k, v of shape (B, H, T, d_head)."""
    T = q.shape[-2]
    # (B, H, T, T): how much token t attends to token s. In bf16 these scores are rounded to 8
    # significant bits before the softmax (the fused kernel keeps them in float32), so the two
    # forms agree to bf16 rounding; the softmax itself sums in float32.
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # M = -inf where s > t
    # The mask is also why right padding never changes the outputs at real tokens.
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return F.dropout(weights, dropout) @ v  # (B, H, T, d_head)


WRITTEN_OUT_MAX_T = 256


def _written_out_is_faster(q) -> bool:
    # Speed only: training in bf16 on a CPU, PyTorch's fused kernel has a slow backward pass, and
    # written out, attention's forward + backward runs 2.5-4x faster at SMS lengths and about as
    # fast at 256 tokens (bench.py --only attention measures it).
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and q.shape[-2] <= WRITTEN_OUT_MAX_T)


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
        V, T, C = cfg.vocab_size, cfg.context_length, cfg.emb_dim
        # The embeddings get their values from init_weights, or from load_gpt2's checkpoint. Made
        # empty: nn.Embedding's own init calls normal_, which on the meta device (load_gpt2) first
        # imports a part of torch that takes 1.5 s and is never needed there.
        self.tok_emb = nn.Embedding(V, C, _weight=torch.empty(V, C))
        self.pos_emb = nn.Embedding(T, C, _weight=torch.empty(T, C))
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = nn.LayerNorm(C, eps=1e-5)
        self.out_head = nn.Linear(C, V, bias=False)
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
                residual = name.endswith(("out_proj.weight", "layers.2.weight"))
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.cfg.n_layers) if residual else 0.02)

    def forward(self, idx):
        B, T = idx.shape
        if T > self.cfg.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.cfg.context_length})")
        pos = torch.arange(T, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.trf_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Keep only the block's input, and run the block again in the backward pass (Chen et
                # al. 2016): up to half again the compute, but the saved activations of one block at a
                # time, not of all of them.
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
    has_tf = (model_dir / "checkpoint").exists() or any(model_dir.glob("*.index"))
    if has_tf and (model_dir / "model.safetensors").exists():  # which weights were meant? Never guess
        raise CheckpointError(f"{model_dir} holds both OpenAI's checkpoint files and a model.safetensors, which "
                              "may be different weights; move one of them to a folder of its own")
    if has_tf:
        tensors = formats.read_tf_checkpoint(model_dir)
        return {k.removeprefix("model/"): v for k, v in tensors.items()}, "TensorFlow checkpoint"
    if (model_dir / "model.safetensors").exists():
        tensors = formats.read_safetensors(model_dir / "model.safetensors")
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
    and the residual stream stays float32. model.weights_fingerprint identifies the weights (see
    _add_to_fingerprint)."""
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
    state, fingerprint = {}, hashlib.sha256()
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
                    f"{shapes[name]} (config: n_embd={cfg.emb_dim}, n_vocab={cfg.vocab_size}, "
                    f"n_ctx={cfg.context_length})")
            _add_to_fingerprint(fingerprint, name, part)
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
    model.weights_fingerprint = fingerprint.hexdigest()[:32]
    return model.to(device).eval()


FINGERPRINT_SAMPLES = 512  # values per tensor


def _add_to_fingerprint(digest, name: str, t: torch.Tensor):
    """Hash a tensor's name, shape and a fixed, strided sample of its values as float32: the same for
    OpenAI's and Hugging Face's files of one model (it is taken after the name table) and for either
    --precision (it is taken before any cast), and about a millisecond for all of 124M."""
    flat = torch.arange(0, t.numel(), max(1, t.numel() // FINGERPRINT_SAMPLES))[:FINGERPRINT_SAMPLES]
    sample = t[torch.unravel_index(flat, t.shape)].float()  # gathered: t may be a transposed view
    digest.update(f"{name}{tuple(t.shape)}".encode() + sample.numpy().astype("<f4").tobytes())


def _check_names(expected: set, found, where: str, n_layers: int):
    """The checkpoint must hold exactly the table's names: none missing, none left over."""
    missing, extra = expected - set(found), set(found) - expected
    if missing or extra:
        parts = [f"missing {cli.listing(missing)}" if missing else "",
                 f"unexpected {cli.listing(extra)}" if extra else ""]
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


def checkpoint_shapes(cfg: GPTConfig) -> dict[str, tuple]:
    """OpenAI's name and shape of every tensor of a GPT-2 of this shape: the name table, backwards."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in GPTModel(cfg).state_dict().items()}
    out = {}
    for ckpt, names, conv in weight_table(cfg.n_layers):
        rows, rest = sum(shapes[n][0] for n in names), shapes[names[0]][1:]  # c_attn: Q, K, V stacked
        out[ckpt] = (1, *rest, rows) if conv else (rows, *rest)  # Conv1D: (1, in, out)
    return out


def write_model_folder(folder, cfg: GPTConfig, tensors: dict[str, np.ndarray], fmt="openai") -> Path:
    """A model folder's weights and config from tensors named and shaped as in checkpoint_shapes
    (bench.py and the tests make offline models of random weights this way; the tokenizer files
    are copied in separately). fmt "openai": hparams.json and a TensorFlow checkpoint, as OpenAI
    released them; "hf": config.json and a model.safetensors, as Hugging Face's hub has them."""
    if fmt not in ("openai", "hf"):
        raise ValueError(f"unknown model folder format {fmt!r}; choose openai or hf")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_name = "hparams.json" if fmt == "openai" else "config.json"
    if fmt == "openai":
        formats.write_tf_checkpoint({f"model/{k}": v for k, v in tensors.items()}, folder / "model.ckpt")
        cli.atomic_write(folder / "checkpoint", 'model_checkpoint_path: "model.ckpt"\n')
    else:  # Hugging Face keeps a Conv1D weight as (in, out)
        hf = {_openai_to_hf(k): v[0] if k.endswith("/w") else v for k, v in tensors.items()}
        formats.write_safetensors(hf, folder / "model.safetensors")
    config = dict(zip(CONFIG_FILES[config_name], (getattr(cfg, field) for field in CONFIG_FIELDS)))
    cli.atomic_write(folder / config_name, json.dumps(config, indent=2))
    return folder


def _openai_to_hf(name: str) -> str:
    # "h3/ln_1/g" -> "h.3.ln_1.weight", "h3/mlp/c_fc/b" -> "h.3.mlp.c_fc.bias", "wte" -> "wte.weight"
    if name in ("wte", "wpe"):
        return name + ".weight"
    name = re.sub(r"/b$", "/bias", re.sub(r"/[gw]$", "/weight", re.sub(r"^h(\d+)/", r"h.\1/", name)))
    return name.replace("/", ".")


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


def download_gpt2(size="124M", cache_dir=None, source="openai", files=None, offline_hint=None) -> Path:
    """Fetch one GPT-2 size into the cache (once) and return its folder.

    source "openai": OpenAI's release files (a TensorFlow checkpoint, each tensor checked against the
    CRC-32C in its index); source "hf": the same weights as model.safetensors from the Hugging Face
    hub (checked against the sha256 the hub announces). files: only these of the folder's files.
    offline_hint: what a failed download's message tells the user to do instead.
    """
    size = resolve_size(size)
    if source not in ("openai", "hf"):
        raise ValueError(f"unknown weights source {source!r}; choose openai or hf")
    folder = download_folder(size, cache_dir, source)
    all_files = OPENAI_FILES if source == "openai" else HF_FILES
    for name in files or all_files:
        if (folder / name).exists():  # a file only gets its final name once it is complete and checked
            continue
        if source == "openai":
            url = OPENAI_URL.format(size=size, file=name)
        else:
            url = HF_URL.format(repo=HF_REPOS[size], file=name)
        check = None
        if name.startswith("model.ckpt.data"):
            check = lambda part: formats.verify_tf_data(folder / "model.ckpt.index", part)  # noqa: E731
        hint = offline_hint or f"point --model-dir at a local copy of the model folder ({', '.join(all_files)})"
        try:
            cli.download_file(url, folder / name, sha256=KNOWN_SHA256.get(name) or KNOWN_SHA256.get(f"{size}/{name}"),
                              check=check)
        except cli.DownloadError as e:
            raise cli.DownloadError(f"{e}. Without internet, {hint}") from None
    return folder


def download_folder(size="124M", cache_dir=None, source="openai") -> Path:
    """Where download_gpt2 keeps one size (nothing is fetched here)."""
    return Path(cache_dir or cli.default_cache_dir()) / ("gpt2" if source == "openai" else "gpt2-hf") / size


def model_folder(size="124M", model_dir=None, cache_dir=None, source="openai") -> Path:
    """The folder to load: model_dir when given (no network), else the cached download."""
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise CheckpointError(f"model folder {model_dir} does not exist or is not a folder; check --model-dir")
        return Path(model_dir)
    return download_gpt2(size, cache_dir=cache_dir, source=source)


# ----------------------------------------------------------------------------------------------
# 7. The model flags every command shares, and this file's own command line: continue a prompt


def add_model_args(parser):
    parser.add_argument("--model", default="124M",
                        help="GPT-2 size: 124M, 355M, 774M, 1558M (or gpt2-small, -medium, -large, -xl)")
    parser.add_argument("--model-dir", default=None,
                        help="a local model folder (OpenAI's files or a model.safetensors); no download")
    parser.add_argument("--weights-source", choices=("openai", "hf"), default="openai",
                        help="where to download from: OpenAI's TensorFlow files or Hugging Face's safetensors")
    parser.add_argument("--cache-dir", default=None,
                        help=f"download cache (default: ${cli.CACHE_ENV}, else $XDG_CACHE_HOME/gpt2-lora "
                             "or ~/.cache/gpt2-lora)")


def main(argv=None):
    cli.run_cli(lambda: generate_cli(argv), "gpt2.py")


def generate_cli(argv):
    parser = cli.ArgumentParser(prog="gpt2.py",
                                description="Continue a prompt with GPT-2 (a check that the weights load right).")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=25, help="how many tokens to add")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=123, help="random seed for sampling")
    add_model_args(parser)
    parser.add_argument("--device", default="auto", help=cli.DEVICE_HELP)
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
    device = cli.pick_device(args.device)
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


if __name__ == "__main__":
    main()
