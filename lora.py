"""LoRA: low-rank adapters for a frozen model, written from scratch.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685).
A pretrained weight W0 stays frozen; each adapted layer learns only a low-rank update:

    h = W0 x + (alpha / r) · B A x        B A: (out, in) of rank r << min(in, out)

Here x is a row vector, as nn.Linear sees it, so the code stores A as (in, r) and B as (r, out)
and computes h = x W0^T + (alpha/r) · x A B. This file holds the adapter layers and everything a
user does with them: inject them into chosen layers, freeze everything else, build the spam
classifier, count parameters, merge the update into W0 for inference at no extra cost, and save
or load only the small adapter as a safetensors file (plain numbers and JSON: nothing that runs).

Usage:
    model = gpt2.load_gpt2(folder)
    build_classifier(model, num_classes=2, rank=16, alpha=16)   # LoRA on every Linear, frozen, new head
    print_trainable_parameters(model)  # trainable params: 2,655,746 || all params: 127,095,554 || ...
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import formats
import gpt2

ADAPTER_FORMAT = "gpt2-lora-adapter"
ADAPTER_VERSION = 2  # 1 was a torch pickle, which this code no longer reads

# Layer groups for `targets`: names of Linear layers inside GPTModel (see gpt2.py)
TARGET_GROUPS = {
    "attn": ("W_query", "W_key", "W_value", "out_proj"),
    "mlp": ("ff.layers.0", "ff.layers.2"),  # FeedForward's C -> 4C and 4C -> C layers
}


MAX_RANK, MAX_ALPHA = 65_536, 1e9  # bounds that a typo cannot pass; the adapter file checks the same


def check_lora_hparams(rank, alpha, dropout=0.0):
    """Raise ValueError unless rank is an integer >= 1, alpha > 0 and 0 <= dropout < 1."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"LoRA rank must be an integer >= 1 (at most {MAX_RANK:,}), got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"LoRA alpha must be a number > 0 (at most {MAX_ALPHA:g}, as an adapter file allows), "
                         f"got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALayer(nn.Module):
    """The low-rank update alone: lora(x) = (alpha / rank) · x A B, for x of shape (..., in_dim);
    A is (in_dim, rank), B (rank, out_dim) (see the module docstring).

    A starts random, uniform in ±1/sqrt(rank) (kaiming_uniform_ with a = sqrt(5), as in the
    course; PyTorch takes the fan-in of the (in_dim, rank) matrix to be rank), and B starts at
    zero, so B A = 0 and the adapted model is exactly the pretrained one at step 0; training then
    moves B away from zero. Dividing by rank (the alpha/r factor) keeps the update's size roughly
    the same when rank changes, so one learning rate serves many ranks.
    """

    def __init__(self, in_dim, out_dim, rank, alpha, dropout=0.0, device=None):
        super().__init__()
        check_lora_hparams(rank, alpha, dropout)
        self.rank, self.alpha, self.dropout = rank, alpha, float(dropout)
        self.scaling = alpha / rank
        # float32 always: the adapter trains in full precision even when the frozen model is bf16
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x, into=None):
        """(alpha / rank) · x A B, of shape (..., out_dim). With into=h, the same update is added to
        h in place and h is returned: LinearWithLoRA's linear(x) + lora(x) without a second
        (..., out_dim) tensor, which saves a third of a training step's memory (measured)."""
        if self.training and self.dropout > 0:  # no kernel launched at all when dropout is 0
            x = F.dropout(x, self.dropout)
        xa = x @ self.A.to(x.dtype)  # (..., in) @ (in, r) -> (..., r): the rank-r bottleneck
        if into is None:
            return self.scaling * (xa @ self.B.to(xa.dtype))  # (..., r) @ (r, out) -> (..., out)
        # Under bf16 autocast h is bf16, and in-place ops are not cast for us, hence the .to casts
        h = into.view(-1, into.shape[-1])
        h.addmm_(xa.reshape(-1, self.rank).to(h.dtype), self.B.to(h.dtype), alpha=self.scaling)
        return into

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}" + (f", dropout={self.dropout}" if self.dropout else "")


class LinearWithLoRA(nn.Module):
    """A frozen nn.Linear plus its LoRA update: h = W0 x + (alpha/r) B A x."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout,
                              device=linear.weight.device)

    def forward(self, x):
        h = self.linear(x)  # W0 x: (..., out_dim)
        # + lora(x) = (alpha/r) x A B, added into h in place: h + self.lora(x) would hold a second
        # (..., out_dim) tensor and cost a third more training memory (measured)
        return self.lora(x, into=h)


def parse_targets(targets) -> tuple[str, ...] | None:
    """None/"all" -> None (every Linear but out_head); else a tuple of layer names, groups expanded.

    targets: a list of names or a comma-separated string, e.g. "attn", ["W_query", "W_value"].
    """
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = targets.split(",")
    names = [t.strip() for t in targets if t.strip()]
    if not names:
        raise ValueError("LoRA targets are empty; use all, attn, mlp or layer names like W_query,W_value")
    if "all" in names:
        return None
    if any(name == "out_head" or name.endswith(".out_head") for name in names):
        raise ValueError("LoRA target out_head: the output head is replaced by the new classification head, "
                         "which trains in full; choose among all, attn, mlp or layer names like W_query,W_value")
    expanded = []
    for name in names:
        for layer in TARGET_GROUPS.get(name, (name,)):
            if layer not in expanded:
                expanded.append(layer)
    return tuple(expanded)


def replace_linear_with_lora(model: nn.Module, rank, alpha, dropout=0.0, targets=None) -> int:
    """Wrap Linear layers of model in LinearWithLoRA, in place; return how many were wrapped.

    By default every nn.Linear except the one named out_head. targets limits the choice to layers
    whose name (or dotted name ending) matches, or to the groups "attn" and "mlp" (see TARGET_GROUPS).
    Layers that are already wrapped are left alone.
    """
    check_lora_hparams(rank, alpha, dropout)
    names = parse_targets(targets)
    matched = set()

    def wanted(full_name):
        if full_name.rsplit(".", 1)[-1] == "out_head":  # replaced by build_classifier's new head
            return False
        if names is None:
            return True
        hits = [t for t in names if full_name == t or full_name.endswith("." + t)]
        matched.update(hits)
        return bool(hits)

    def find(module, prefix):
        # (parent, child name, full name, layer) of every Linear to wrap, depth first. An existing
        # LinearWithLoRA is not entered, so its inner `linear` is never wrapped a second time.
        for child_name, child in module.named_children():
            full_name = prefix + child_name
            if isinstance(child, nn.Linear):
                if wanted(full_name):
                    yield module, child_name, full_name, child
            elif not isinstance(child, LinearWithLoRA):
                yield from find(child, full_name + ".")

    chosen = list(find(model, ""))  # everything is checked before the first layer is wrapped
    unknown = [t for t in names or () if t not in matched]
    if unknown or not chosen:
        raise ValueError(f"LoRA target {', '.join(unknown) or 'all'} matches no unadapted Linear layer; "
                         f"use all, {', '.join(TARGET_GROUPS)} or names such as {_linear_names(model)}")
    for _, _, full_name, layer in chosen:  # B A has rank at most min(in, out): a larger r adds nothing
        if rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"LoRA rank {rank} is larger than {full_name} ({layer.in_features} -> "
                             f"{layer.out_features}); use a rank of at most "
                             f"{min(layer.in_features, layer.out_features)}")
    for parent, child_name, _, layer in chosen:
        setattr(parent, child_name, LinearWithLoRA(layer, rank, alpha, dropout))
    return len(chosen)


def _linear_names(model) -> str:
    """The short names of a model's Linear layers: "trf_blocks.3.att.W_key" -> "W_key",
    "trf_blocks.3.ff.layers.0" -> "ff.layers.0"."""
    def short(name):
        parts = name.split(".")
        return ".".join(parts[-3:]) if parts[-1].isdigit() else parts[-1]
    return ", ".join(sorted({short(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}))


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def freeze_and_activate_lora(model: nn.Module):
    """Freeze every parameter, then make only the LoRA matrices A and B trainable."""
    for p in model.parameters():
        # frozen tensors get no .grad at all, so backward computes only the input gradients through them
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.A.requires_grad_(True)
        layer.B.requires_grad_(True)


def build_classifier(model: nn.Module, num_classes: int, rank, alpha, dropout=0.0, targets=None) -> nn.Module:
    """GPT-2 as a LoRA classifier, in place: inject adapters, freeze everything, add the new head.

    The order matters: the head is added after freezing, so the trainable parameters are exactly
    the LoRA matrices and the new num_classes-way head. train.py, predict.py and bench.py all build
    their model here."""
    replace_linear_with_lora(model, rank, alpha, dropout, targets=targets)
    freeze_and_activate_lora(model)
    gpt2.add_classification_head(model, num_classes)
    return model


def count_parameters(model: nn.Module, skip=()) -> tuple[int, int]:
    """(trainable, total), each tensor counted once: named_parameters() skips a tied duplicate.
    skip: names of top-level modules left out, e.g. ("out_head",)."""
    params = [p for name, p in model.named_parameters() if name.split(".")[0] not in skip]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module, skip=()):
    trainable, total = count_parameters(model, skip)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.2f}%")


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer, in place: W <- W + scaling · (A B)^T; return the count.

    Each LinearWithLoRA is replaced by its own nn.Linear with the merged weight (a new tensor: the
    pretrained one is not written to), so inference costs exactly what the base model costs. The
    sum is formed in float32 even for a bf16/fp16 model, then cast back once.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LinearWithLoRA):
                linear, lora = child.linear, child.lora
                W = linear.weight  # (out, in)
                # A B is (in, out), so form W^T + scaling · A B in one addmm and view it transposed:
                # for weights loaded from OpenAI's (in, out) layout, W^T is the contiguous one
                merged = torch.addmm(W.T.float(), lora.A.float(), lora.B.float(), alpha=lora.scaling)
                linear.weight = nn.Parameter(merged.to(W.dtype).T, requires_grad=W.requires_grad)
                setattr(parent, name, linear)
                count += 1
    return count


# ----------------------------------------------------------------------------------------------
# The adapter file: only what training changed (every A and B, and the new head), as safetensors.
# Its __metadata__ holds one JSON value per key (the format allows only strings there); every key
# is checked against ADAPTER_SCHEMA in one place, check_adapter_meta, when a file is written or read.


def _number(low, high, integer=False, low_open=False):
    def check(v):
        ok_type = type(v) is int if integer else type(v) in (int, float)
        return ok_type and math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    return check


def _names(v):
    return isinstance(v, list) and v != [] and all(isinstance(x, str) and x for x in v)


ADAPTER_SCHEMA = {  # key: (check, what it must be); other keys are kept but not required (newer files)
    "rank": (_number(1, MAX_RANK, integer=True), "a whole number >= 1"),
    "alpha": (_number(0, MAX_ALPHA, low_open=True), "a number > 0"),
    "dropout": (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)"),
    "targets": (lambda v: v == "all" or _names(v), '"all" or a list of layer names'),
    "labels": (lambda v: _names(v) and len(v) == 2 and v[0] != v[1], "two different label names"),
    "max_length": (_number(1, gpt2.CONFIG_BOUNDS["context_length"], integer=True), "a whole number >= 1"),
    "config": (lambda v: isinstance(v, dict) and all(type(v.get(k)) is int and v[k] >= 1 for k in gpt2.CONFIG_BOUNDS),
               "the base model's shape: " + ", ".join(gpt2.CONFIG_BOUNDS)),
    "threshold": (_number(0, 1), "a probability in [0, 1]"),
    "precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16"),
}


def check_adapter_meta(meta: dict, where) -> dict:
    """meta itself, once every key of ADAPTER_SCHEMA is there with a valid value (else ValueError)."""
    for key, (ok, what) in ADAPTER_SCHEMA.items():
        if key not in meta:
            raise ValueError(f"{where}: the adapter metadata lacks {key!r}; retrain with python train.py")
        if not ok(meta[key]):
            raise ValueError(f"{where}: adapter metadata {key} is {meta[key]!r:.60}; expected {what}")
    return meta


def _head_is_trained(model) -> bool:
    head = getattr(model, "out_head", None)
    tok_emb = getattr(model, "tok_emb", None)
    return head is not None and (tok_emb is None or head.weight is not tok_emb.weight)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: every LoRA A and B, and out_head once it is no longer tied."""
    state = {name: p for name, p in model.named_parameters() if name.endswith((".lora.A", ".lora.B"))}
    # a head still tied to tok_emb is GPT-2's own and needs no saving; a replaced one was trained
    if _head_is_trained(model):
        state.update({f"out_head.{n}": p for n, p in model.out_head.named_parameters()})
    return state


def _lora_summary(model) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call replace_linear_with_lora first")
    settings = {(m.rank, m.alpha, m.dropout) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError("the LoRA layers differ in rank, alpha or dropout; one adapter file needs one setting")
    rank, alpha, dropout = settings.pop()
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "layers": len(layers)}


def save_adapter(model: nn.Module, path, meta: dict):
    """Write the adapter (see adapter_state) and its metadata to path as safetensors, atomically.

    meta: JSON values for the keys of ADAPTER_SCHEMA (rank, alpha and dropout are taken from the
    model) and any others, e.g. the base model's size and folder. A non-finite weight is refused."""
    cli.atomic_write(path, adapter_writer(model, meta, path))


def adapter_writer(model: nn.Module, meta: dict, path="the adapter"):
    """What save_adapter writes, as a function of an open file (for cli.atomic_write_all)."""
    meta = check_adapter_meta({**meta, **_lora_summary(model)}, path)
    tensors = {name: p.detach().float().cpu().numpy() for name, p in adapter_state(model).items()}
    bad = [name for name, a in tensors.items() if not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"the adapter holds NaN or infinite weights ({cli.listing(bad, 2)}); not saved")
    header = {"format": ADAPTER_FORMAT, "version": str(ADAPTER_VERSION)}
    header.update({key: json.dumps(value) for key, value in meta.items()})
    return formats.safetensors_writer(tensors, metadata=header)


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of an adapter file, every check done before a tensor is used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}; train one with python train.py --out {path}")
    _refuse_pickle(path)
    try:
        arrays, header = formats.read_safetensors(path, with_metadata=True)
        if header.get("format") != ADAPTER_FORMAT:
            raise ValueError("it is not a LoRA adapter made by train.py")
        if header.get("version") != str(ADAPTER_VERSION):
            raise ValueError(f"it has adapter format version {header.get('version')}; "
                             f"this code reads {ADAPTER_VERSION}")
        meta = {k: _json_value(k, v) for k, v in header.items() if k not in ("format", "version")}
        not_float = [f"{name} ({a.dtype})" for name, a in arrays.items() if a.dtype.kind != "f"]
        if not_float:  # weights are never silently cast from integers or booleans
            raise ValueError(f"tensor {cli.listing(not_float, 2)} holds no floating-point weights")
    except (formats.CheckpointError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not a readable adapter file ({str(e).removeprefix(str(path) + ': ')})") from None
    tensors = {name: torch.from_numpy(np.array(a, np.float32)) for name, a in arrays.items()}
    if any(not torch.isfinite(t).all() for t in tensors.values()):
        raise ValueError(f"{path} holds NaN or infinite weights; retrain it")
    return check_adapter_meta(meta, path), tensors


def is_adapter(path) -> bool:
    """Whether path is a file that train.py wrote (by its header alone; its tensors are not read)."""
    try:
        return formats.read_safetensors_header(path)[1].get("format") == ADAPTER_FORMAT
    except (formats.CheckpointError, OSError):
        return False


def _json_value(key: str, text: str):
    """One metadata value: JSON for the keys train.py writes; a key this code does not know (from a
    newer version, or added by hand) is kept as it is, JSON or not."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        if key in ADAPTER_SCHEMA or key == "base_fingerprint":
            raise ValueError(f"metadata {key} is not JSON ({str(e)[:60]})") from None
        return text


def _refuse_pickle(path: Path):
    """The old adapter format was a torch.save pickle, which is never loaded (it could run code)."""
    with open(path, "rb") as f:
        start = f.read(9)
    # a safetensors header (its JSON at byte 8) may also start with 0x80, when its length is 128 modulo 256
    old = start[:1] == b"\x80" and start[8:9] != b"{"  # a raw pickle
    if start.startswith(b"PK\x03\x04") and start[8:9] != b"{":  # a zip: torch.save's holds .../data.pkl
        try:
            with zipfile.ZipFile(path) as zf:
                old = any(name.endswith("data.pkl") for name in zf.namelist())
        except (zipfile.BadZipFile, OSError, EOFError):
            old = False
        if not old:
            raise ValueError(f"{path} is a zip archive, not an adapter; pass the .safetensors file that "
                             "train.py wrote")
    if old:
        raise ValueError(f"{path} is an adapter of the old pickle format, which is never loaded (it could "
                         "run code); retrain with python train.py to get a .safetensors adapter")


def load_adapter(model: nn.Module, path, adapter=None) -> dict:
    """Copy an adapter file's tensors into model (which must have the same LoRA layout); return meta.

    adapter: the (meta, tensors) that read_adapter(path) returned, if the caller already has them.
    Everything is checked before anything is copied, so a mismatch never leaves a half-loaded model.
    """
    meta, tensors = adapter or read_adapter(path)
    summary = _lora_summary(model)
    for key in ("rank", "alpha"):
        if meta.get(key) != summary[key]:
            raise ValueError(f"{path} was trained with LoRA {key} {meta.get(key)}, "
                             f"but the model has {key} {summary[key]}")
    state = adapter_state(model)
    missing, extra = state.keys() - tensors.keys(), tensors.keys() - state.keys()
    if missing or extra:
        detail = "; ".join(x for x in (f"the model also adapts {cli.listing(missing, 3)}" if missing else "",
                                       f"the file also has {cli.listing(extra, 3)}" if extra else "") if x)
        raise ValueError(f"{path} was made for other LoRA targets or another model ({detail})")
    # the same names can still hold other shapes: rank, head size or model width differ
    for name, param in state.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            what = "a classification head of another size" if name.startswith("out_head") else "another model size"
            raise ValueError(f"{path} was made for {what}: {name} is {tuple(tensors[name].shape)} in the file, "
                             f"{tuple(param.shape)} in the model")
    with torch.no_grad():
        for name, param in state.items():
            param.copy_(tensors[name])
    return meta
