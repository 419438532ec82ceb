"""LoRA: low-rank adapters for a frozen model, written from scratch.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685).
A pretrained weight W0 stays frozen; each adapted layer learns only a low-rank update:

    h = W0 x + (alpha / r) · B A x        A: (r, in), B: (out, r), r << min(in, out)

This file holds the adapter layers and everything a user does with them: inject them into chosen
layers, freeze everything else, count parameters, merge the update into W0 for inference at no
extra cost, and save or load only the small adapter, safely (no pickle that could run code).

Usage:
    model = gpt2.load_gpt2(folder)
    replace_linear_with_lora(model, rank=16, alpha=16)        # every Linear but out_head
    freeze_and_activate_lora(model)
    print_trainable_parameters(model)  # trainable params: 2,654,208 || all params: 127,094,016 || ...
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_FORMAT = "gpt2-lora-adapter"
ADAPTER_VERSION = 1

# Layer groups for `targets`: names of Linear layers inside GPTModel (see gpt2.py)
TARGET_GROUPS = {
    "attn": ("W_query", "W_key", "W_value", "out_proj"),
    "mlp": ("ff.layers.0", "ff.layers.2"),  # FeedForward's C -> 4C and 4C -> C layers
}


def check_lora_hparams(rank, alpha, dropout=0.0):
    """Raise ValueError unless rank is an integer >= 1, alpha > 0 and 0 <= dropout < 1."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALayer(nn.Module):
    """The low-rank update alone: x (..., in_dim) -> (alpha / rank) · x A B, shape (..., out_dim).

    With x as a row vector (as nn.Linear sees it) the paper's h = W0 x + (alpha/r) · B A x reads
    h = x W0^T + (alpha/r) · x A B here, with A: (in_dim, rank) and B: (rank, out_dim).
    A starts random (Kaiming-uniform, as nn.Linear initialises its weights) and B starts at zero,
    so B A = 0 and the adapted model is exactly the pretrained one at step 0; training then moves
    B away from zero. Dividing by rank (the alpha/r factor) keeps the update's size roughly the same
    when rank changes, so one learning rate serves many ranks.
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

    def _dropped(self, x):
        if self.training and self.dropout > 0:  # no kernel launched at all when dropout is 0
            x = F.dropout(x, self.dropout)
        return x

    def forward(self, x):
        return self.scaling * (self._dropped(x) @ self.A @ self.B)  # (..., in) @ (in, r) @ (r, out)

    def add_to(self, h, x):
        """h += forward(x), in place: the same sum without a second (..., out) tensor, which saves
        a third of a training step's memory. (The .to casts: under bf16 autocast h is bf16.)"""
        xa = self._dropped(x).reshape(-1, x.shape[-1]) @ self.A.to(x.dtype)  # (N, rank)
        h.view(-1, h.shape[-1]).addmm_(xa.to(h.dtype), self.B.to(h.dtype), alpha=self.scaling)
        return h

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}" + (f", dropout={self.dropout}" if self.dropout else "")


class LinearWithLoRA(nn.Module):
    """A frozen nn.Linear plus its LoRA update: linear(x) + lora(x)."""

    def __init__(self, linear_layer: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.linear = linear_layer
        self.lora = LoRALayer(linear_layer.in_features, linear_layer.out_features, rank, alpha, dropout,
                              device=linear_layer.weight.device)

    def forward(self, x):
        # linear(x) + lora(x), with the update added into the linear layer's fresh output
        return self.lora.add_to(self.linear(x), x)


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
        if names is None:
            return full_name.rsplit(".", 1)[-1] != "out_head"
        hits = [t for t in names if full_name == t or full_name.endswith("." + t)]
        matched.update(hits)
        return bool(hits)

    def wrap(module, prefix):
        # Replace children in their parent (setattr), depth first. An existing LinearWithLoRA is not
        # entered, so its inner `linear` is never wrapped a second time.
        count = 0
        for child_name, child in module.named_children():
            full_name = prefix + child_name
            if isinstance(child, nn.Linear):
                if wanted(full_name):
                    setattr(module, child_name, LinearWithLoRA(child, rank, alpha, dropout))
                    count += 1
            elif not isinstance(child, LinearWithLoRA):
                count += wrap(child, full_name + ".")
        return count

    count = wrap(model, "")
    unknown = [t for t in names or () if t not in matched]
    if unknown or count == 0:
        def short(name):  # "trf_blocks.3.att.W_key" -> "W_key", "trf_blocks.3.ff.layers.0" -> "ff.layers.0"
            parts = name.split(".")
            return ".".join(parts[-3:]) if parts[-1].isdigit() else parts[-1]
        linear_names = sorted({short(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA target {', '.join(unknown) or 'all'} matches no unadapted Linear layer; use all, "
            f"{', '.join(TARGET_GROUPS)} or names such as {', '.join(linear_names)}"
        )
    return count


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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each tensor counted once: model.parameters() skips a tied duplicate."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module):
    trainable, total = count_parameters(model)
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
# Saving and loading only what training changed: the A/B matrices and the classification head


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


def save_adapter(model: nn.Module, path, meta: dict | None = None):
    """Write the adapter (see adapter_state) and metadata to path, via a temporary file.

    meta: builtin values only (str, int, float, bool, None, lists, dicts), e.g. the base model
    size, targets, max_length and label names; rank, alpha and dropout are taken from the model.
    """
    path = Path(path)
    blob = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "meta": {**(meta or {}), **_lora_summary(model)},
        # clone: a compact copy, so a view never drags its whole storage into the file
        "tensors": {name: p.detach().to("cpu", copy=True).contiguous() for name, p in adapter_state(model).items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of an adapter file, read with weights_only=True so no code can run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only: whatever failed, no code from the file has run
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable adapter file (truncated, or not made by train.py): "
                         f"{first_line[:160]}") from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a LoRA adapter file made by train.py")
    if blob.get("version") != ADAPTER_VERSION:
        raise ValueError(f"{path} has adapter format version {blob.get('version')!r}; this code reads {ADAPTER_VERSION}")
    tensors, meta = blob.get("tensors"), blob.get("meta")
    if not isinstance(tensors, dict) or not isinstance(meta, dict) or not all(
            isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path} is a damaged adapter file (no tensors or metadata)")
    return meta, tensors


def load_adapter(model: nn.Module, path, adapter=None) -> dict:
    """Copy an adapter file's tensors into model (which must have the same LoRA layout); return meta.

    adapter: the (meta, tensors) that read_adapter(path) returned, if the caller already has them.
    Everything is checked before anything is copied, so a mismatch never leaves a half-loaded model.
    """
    meta, tensors = adapter or read_adapter(path)
    summary = _lora_summary(model)
    for key in ("rank", "alpha"):
        if meta.get(key) != summary[key]:
            raise ValueError(f"{path} was trained with LoRA {key} {meta.get(key)}, but the model has {key} {summary[key]}")
    state = adapter_state(model)
    missing, extra = state.keys() - tensors.keys(), tensors.keys() - state.keys()
    if missing or extra:
        def short(names):
            names = sorted(names)
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        detail = "; ".join(x for x in (f"the model also adapts {short(missing)}" if missing else "",
                                       f"the file also has {short(extra)}" if extra else "") if x)
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
