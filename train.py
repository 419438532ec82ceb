"""Fine-tune GPT-2 with LoRA to classify SMS messages as spam or ham.

The recipe of Raschka's "Build a Large Language Model (From Scratch)", appendix E, done the
way its own experiments recommend: GPT-2 is frozen; LoRA adapters (Hu et al. 2021) go on every
Linear layer; the 50,257-way output head is replaced by a trainable 2-way one; and each message
is classified from the logits at its last real token, with batches padded only as far as needed.
The run has four steps, each a function below: build, fit, evaluate, save.

Usage:
    python train.py --rank 16                         # downloads GPT-2 124M and the data once
    python train.py --model-dir DIR --data FILE       # offline
    python predict.py "You have won a prize, call now"
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.exit_on_signals_while_importing("train.py", "interrupted; nothing was saved")  # torch takes ~2 s

import argparse
import json
import math
import os
import secrets
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from xml.sax.saxutils import escape

import torch
import torch.nn as nn

import data
import gpt2
import lora

DEFAULT_OUT = "spam_lora.safetensors"
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the validation report shows precision and recall


# ----------------------------------------------------------------------------------------------
# 1. Training: one step, one epoch, the whole fit

def train_step(model, optimizer, input_ids, last_index, labels, precision="fp32"):
    """One optimizer step on one batch; returns (loss, logits (B, 2))."""
    with cli.autocast_for(input_ids.device, precision):
        logits = gpt2.logits_at_last_token(model, input_ids, last_index)  # (B, 2), float32
    loss = nn.functional.cross_entropy(logits, labels)  # the loss itself in float32
    # set_to_none: gradients are freed between steps instead of being zeroed and kept
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def train_epoch(model, loader, optimizer, device, epoch, log_every, precision="fp32", clock=None):
    """One pass over the training data; returns (average loss, accuracy, [(batch, loss) logged]).

    clock: (start time, batches done before this epoch, batches in the whole run), for the ETA."""
    model.train()
    total_loss, correct, seen, logged = 0.0, 0, 0, []
    for batch, (input_ids, last_index, labels) in enumerate(loader):
        input_ids, last_index, labels = input_ids.to(device), last_index.to(device), labels.to(device)
        loss, logits = train_step(model, optimizer, input_ids, last_index, labels, precision)
        value = loss.item()
        if not math.isfinite(value):
            raise ValueError(f"the loss became {value} in epoch {epoch}, batch {batch}; training stopped and "
                             "nothing was saved. Try a smaller --lr")
        total_loss += value * len(labels)  # batches differ in size: weight by messages
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
        if batch % log_every == 0:
            logged.append((batch, value))
            print(f"Epoch {epoch} | Batch {batch}/{len(loader)} | Loss: {value:.4f}{eta(clock, batch + 1)}", flush=True)
    return total_loss / seen, correct / seen, logged


def fit(model, loaders, args, device, precision):
    """Train for args.epochs; keep the adapter of the best (lowest validation loss) or last epoch.
    Returns (history, logged batch losses as (epoch progress, loss), the kept epoch)."""
    # Only the trainable tensors go to the optimizer: the frozen 124M get no AdamW state at all
    # (AdamW keeps two extra tensors per parameter, which would triple the model's memory).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    history, curve, best, kept = [], [], math.inf, None
    n = len(loaders["train"])
    clock = (time.perf_counter(), 0, n * args.epochs)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        avg_loss, train_acc, logged = train_epoch(model, loaders["train"], optimizer, device, epoch,
                                                  args.log_every, precision, (clock[0], n * (epoch - 1), clock[2]))
        curve += [(epoch - 1 + (batch + 1) / n, loss) for batch, loss in logged]
        labels, probs, val_loss = spam_probabilities(model, loaders["val"], device, precision)
        if not math.isfinite(val_loss):
            raise ValueError(f"the validation loss became {val_loss} in epoch {epoch}; training stopped and "
                             "nothing was saved. Try a smaller --lr")
        val_acc = binary_metrics(labels, probs, args.threshold)["accuracy"]
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "avg_loss": avg_loss, "train_accuracy": train_acc, "val_loss": val_loss,
                        "val_accuracy": val_acc, "seconds": seconds})
        print(f"Epoch {epoch} Finished | Avg Loss: {avg_loss:.4f} | Acc: {100 * train_acc:.2f}% | "
              f"Val Acc: {100 * val_acc:.2f}% | Time: {seconds:.2f}s", flush=True)
        if args.keep == "last" or val_loss < best:  # a copy of what the adapter file would hold
            best, kept = val_loss, {k: v.detach().clone() for k, v in lora.adapter_state(model).items()}
            history[-1]["kept"] = True
            for h in history[:-1]:
                h.pop("kept", None)
    with torch.no_grad():
        for name, param in lora.adapter_state(model).items():
            param.copy_(kept[name])
    kept_epoch = next(h["epoch"] for h in history if h.get("kept"))
    print(f"Kept the adapter of epoch {kept_epoch} ({'lowest validation loss' if args.keep == 'best' else 'the last'})")
    return history, curve, kept_epoch


def eta(clock, batches_done_now) -> str:
    """' | 0:42 left' for the whole run, from the pace of the batches so far."""
    if clock is None:
        return ""
    start, done_before, total = clock
    done = done_before + batches_done_now
    left = (time.perf_counter() - start) / done * (total - done)
    return f" | {int(left // 60)}:{int(left % 60):02d} left"


# ----------------------------------------------------------------------------------------------
# 2. Evaluation

@torch.inference_mode()
def spam_probabilities(model, loader, device, precision="fp32", name=None):
    """(true labels, P(spam) of each message, mean cross-entropy) over a whole loader."""
    model.eval()
    labels, probs, loss_sum = [], [], 0.0
    started = time.perf_counter()
    for batch, (input_ids, last_index, y) in enumerate(loader, start=1):
        with cli.autocast_for(device, precision):
            logits = gpt2.logits_at_last_token(model, input_ids.to(device), last_index.to(device))  # (B, 2)
        loss_sum += nn.functional.cross_entropy(logits, y.to(device), reduction="sum").item()
        probs += torch.softmax(logits, dim=-1)[:, 1].tolist()
        labels += y.tolist()
        if name and batch % 50 == 0:  # a large split (4,080 unused messages) shows its progress
            print(f"Evaluating {name} | Batch {batch}/{len(loader)}{eta((started, 0, len(loader)), batch)}", flush=True)
    return labels, probs, loss_sum / max(len(labels), 1)


def evaluate(model, loaders, args, device, precision) -> dict:
    """Validation thresholds and ROC AUC, then the test set (and the unused ham) at --threshold."""
    labels, probs, _ = spam_probabilities(model, loaders["val"], device, precision)
    auc = roc_auc(labels, probs)
    print(f"\nValidation: ROC AUC {auc:.4f}" if auc is not None else "\nValidation: ROC AUC undefined (one class)")
    print("  threshold  spam precision  spam recall")
    table = [binary_metrics(labels, probs, t) for t in sorted({*THRESHOLDS, args.threshold})]
    for row in table:
        print(f"  {row['threshold']:>9.2f}  {row['precision']:>14.4f}  {row['recall']:>11.4f}"
              + ("   <- --threshold" if row["threshold"] == args.threshold else ""))
    test = binary_metrics(*spam_probabilities(model, loaders["test"], device, precision)[:2], args.threshold)
    c = test["confusion"]
    print(f"\nTest Set Accuracy: {100 * test['accuracy']:.2f}%")
    print(f"Spam precision: {test['precision']:.4f} | recall: {test['recall']:.4f} | F1: {test['f1']:.4f}")
    print("Confusion matrix (rows: true label, columns: predicted):")
    print(f"{'':>10}{'ham':>8}{'spam':>8}\n{'ham':>10}{c['ham_as_ham']:>8,}{c['ham_as_spam']:>8,}\n"
          f"{'spam':>10}{c['spam_as_ham']:>8,}{c['spam_as_spam']:>8,}")
    metrics = {"val": {"roc_auc": auc, "thresholds": table}, "test": test}
    if "unused" in loaders:
        _, probs, _ = spam_probabilities(model, loaders["unused"], device, precision, name="unused")
        false_pos = sum(p >= args.threshold for p in probs)
        metrics["unused"] = {"messages": len(probs), "false_positives": false_pos,
                             "false_positive_rate": false_pos / len(probs)}
        print(f"False positives on the {len(probs):,} unused ham messages: {false_pos:,} "
              f"({100 * false_pos / len(probs):.2f}%)")
    return metrics


def binary_metrics(labels, probs, threshold=0.5) -> dict:
    """Accuracy, and precision / recall / F1 for the spam class, calling spam P(spam) >= threshold."""
    # spam is the positive class: precision = how many flagged messages were spam, recall = how many
    # spam messages were flagged
    preds = [int(p >= threshold) for p in probs]
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": threshold, "accuracy": (tp + tn) / max(len(labels), 1), "precision": precision,
            "recall": recall, "f1": f1,
            "confusion": {"ham_as_ham": tn, "ham_as_spam": fp, "spam_as_ham": fn, "spam_as_spam": tp}}


def roc_auc(labels, probs) -> float | None:
    """P(a random spam message scores above a random ham one), ties counting 1/2 (Mann-Whitney U)."""
    spam = [p for p, y in zip(probs, labels) if y == 1]
    ham = [p for p, y in zip(probs, labels) if y == 0]
    if not spam or not ham:
        return None
    ranked = sorted(probs)
    rank = {}  # the average 1-based rank of each distinct score, so that ties share it
    for i, p in enumerate(ranked, start=1):
        rank.setdefault(p, []).append(i)
    u = sum(sum(rank[p]) / len(rank[p]) for p in spam) - len(spam) * (len(spam) + 1) / 2
    return u / (len(spam) * len(ham))


# ----------------------------------------------------------------------------------------------
# 3. The run: build, fit, evaluate, save

def run(args):
    device = cli.pick_device(args.device)
    check_device(args, device)
    model, folder, loaders, precision = build(args, device)
    history, curve, kept_epoch = fit(model, loaders, args, device, precision)
    metrics = evaluate(model, loaders, args, device, precision)
    save(model, folder, loaders, args, precision, {"history": history, "kept_epoch": kept_epoch, **metrics}, curve)


def build(args, device):
    """The model, its tokenizer, the data loaders and the precision: everything before training."""
    torch.manual_seed(args.seed)  # LoRA's A and the new head are the only random initialisations
    precision, why = cli.choose_precision(args.precision, device)
    messages, notes = data.read_messages(data.data_path(args.data, args.cache_dir))  # a --data typo first
    for note in notes:
        print(note, file=sys.stderr)
    splits = data.split_dataset(messages, seed=args.seed)
    if not args.eval_unused:
        splits.pop("unused")  # 4,080 messages: not worth tokenizing unless asked for
    elif not splits["unused"]:
        raise ValueError("--eval-unused: this data file leaves no unused messages (its classes are balanced)")
    elif any(label for _, label in splits["unused"]):
        raise ValueError("--eval-unused measures false positives on the ham left out by balancing, but this "
                         "file has more spam than ham, so the messages left out are spam; drop --eval-unused")
    folder = gpt2.model_folder(args.model, args.model_dir, args.cache_dir, args.weights_source)
    model, tokenizer = gpt2.load_model_and_tokenizer(
        folder, device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    loaders = data.make_loaders(splits, tokenizer, batch_size=args.batch_size, seed=args.seed,
                                max_length=args.max_length, bucket=args.bucket,
                                context_length=model.cfg.context_length)
    print(f"Data: {len(splits['train']):,} train, {len(splits['val']):,} val, {len(splits['test']):,} test "
          f"messages; max length {loaders['train'].dataset.max_length} tokens; device {device}")
    print(f"precision: {precision} ({why})")

    print(f"\nModel before LoRA (the first of {len(model.trf_blocks)} transformer blocks):")
    print(model.trf_blocks[0])
    lora.build_classifier(model, len(data.LABELS), args.rank, args.alpha, args.lora_dropout, targets=args.targets)
    model.gradient_checkpointing = args.gradient_checkpointing
    check_out(Path(args.out), need=4 * sum(p.numel() for p in model.parameters() if p.requires_grad) + 2**24)
    print("\nModel after LoRA:")
    print(model.trf_blocks[0])
    lora.print_trainable_parameters(model, skip=("out_head",))  # the counts before the new head
    print("With the new classification head:")
    lora.print_trainable_parameters(model)
    print()
    return model, folder, loaders, precision


def save(model, folder, loaders, args, precision, metrics, curve):
    """The adapter, its metrics and its curves, all with one run id: each is written in full to a
    temporary file first, then the three are renamed into place with Ctrl-C held back, so a full
    disk replaces nothing and a reader never finds a new adapter beside another run's metrics."""
    out = Path(args.out)
    run_id = secrets.token_hex(8)
    # the size name predict.py would download if the folder is gone; from the folder's own shape
    size = next((name for name, cfg in gpt2.GPT2_SIZES.items() if cfg == model.cfg), args.model)
    meta = {"model": size, "model_dir": str(folder.resolve()), "weights_source": args.weights_source,
            "config": {k: v for k, v in asdict(model.cfg).items() if k in gpt2.CONFIG_BOUNDS},
            "targets": list(args.targets) if args.targets else "all", "max_length": loaders["train"].dataset.max_length,
            "labels": list(data.LABELS), "threshold": args.threshold, "precision": precision, "seed": args.seed,
            "kept_epoch": metrics["kept_epoch"], "run_id": run_id}
    metrics = {"run_id": run_id, "precision": precision, **metrics,
               "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}
    files = {out.with_name(out.name + ".metrics.json"): json.dumps(metrics, indent=2) + "\n",
             out.with_name(out.name + ".curves.svg"): curves_svg(curve, metrics["history"]),
             out: lora.adapter_writer(model, meta, out)}  # only A, B and the head: 10.6 MB for rank 16 on 124M
    with cli.interrupts_deferred() as interrupted:
        cli.atomic_write_all(files)
    print(f"\nSaved the adapter to {out} ({out.stat().st_size / 1e6:.1f} MB), metrics to {out}.metrics.json "
          f"and curves to {out}.curves.svg")
    if interrupted:
        sys.stderr.write("train.py: interrupted just as the adapter was being saved; it was saved\n")
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# 4. The command line, every argument checked before anything loads

def main(argv=None):
    cli.run_cli(lambda: run(parse_args(argv)), "train.py", expected=(data.DataError,),
                 interrupted="interrupted; nothing was saved (an existing adapter is untouched)",
                 memory_tip="try a smaller --batch-size or model, or --gradient-checkpointing if it is off")


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="train.py", description="Fine-tune GPT-2 with LoRA to tell spam from ham.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--targets", default="all",
                   help="layers to adapt: all, attn, mlp, or names such as W_query,W_value")
    gpt2.add_model_args(p)
    p.add_argument("--data", default=None, help="SMSSpamCollection, its zip, or your own .tsv/.csv "
                                                "(default: download the official file once)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training messages")
    p.add_argument("--batch-size", type=int, default=8, help="messages per optimizer step")
    p.add_argument("--lr", type=float, default=8e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate messages to this many tokens (default: the longest training message)")
    p.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=True,
                   help="batch messages of similar length together (less padding); --no-bucket: random batches")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="which epoch's adapter to save: the one with the lowest validation loss, or the last")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="P(spam) at or above which a message is called spam; stored in the adapter")
    p.add_argument("--seed", type=int, default=42, help="seed of the split, the batch order and the init")
    p.add_argument("--device", default="auto", help=cli.DEVICE_HELP)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help=cli.PRECISION_HELP)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the rest in the backward pass: far "
                        "less memory for the larger models, 30-70%% more time (measured), the same results")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="adapter file to write; beside it <out>.metrics.json and <out>.curves.svg")
    p.add_argument("--eval-unused", action="store_true",
                   help="also report the false-positive rate on the ham messages left out by balancing")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every this many batches")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    """Every argument checked before anything is loaded: one line and exit 2 for the first bad one."""
    checks = [
        (1 <= args.epochs <= 100_000, "--epochs must be at least 1 and at most 100,000"),
        (1 <= args.batch_size <= 65_536, "--batch-size must be at least 1 and at most 65,536"),
        (math.isfinite(args.lr) and 0 < args.lr <= 10, "--lr must be a number > 0 and at most 10"),
        (math.isfinite(args.weight_decay) and 0 <= args.weight_decay <= 10, "--weight-decay must be between 0 and 10"),
        (math.isfinite(args.alpha), "LoRA alpha must be a number > 0 (finite)"),
        (0 <= args.threshold <= 1, "--threshold must be a probability between 0 and 1"),
        (args.max_length is None or 1 <= args.max_length <= gpt2.CONFIG_BOUNDS["context_length"],
         "--max-length must be at least 1 (and at most the model's context)"),
        (1 <= args.log_every <= 10**9, "--log-every must be at least 1"),
        (0 <= args.seed < 2**63, "--seed must be between 0 and 2**63 - 1"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    try:
        lora.check_lora_hparams(args.rank, args.alpha, args.lora_dropout)
        args.targets = lora.parse_targets(args.targets)
        args.model = gpt2.resolve_size(args.model)
        check_out(Path(args.out))
    except ValueError as e:
        p.error(str(e))
    if args.alpha == int(args.alpha):
        args.alpha = int(args.alpha)  # 16, not 16.0, in the printout and the adapter file


def check_out(out: Path, need=64 * 2**20):
    """--out must be a regular file we can create beside, on a disk with `need` bytes free: found
    now, not after the whole training (build checks again once the adapter's size is known)."""
    folder = out.parent
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise ValueError(f"--out {out} is a folder or a device; give a file name such as {DEFAULT_OUT}")
    if not folder.is_dir():
        raise ValueError(f"--out {out}: folder {folder} does not exist; create it or choose another --out")
    probe = folder / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.probe"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {folder} ({e.strerror}); choose another --out") from None
    if shutil.disk_usage(folder).free < need:
        raise ValueError(f"--out {out}: less than {need / 1e6:,.0f} MB free in {folder} (the adapter and its "
                         "metrics need that); free some space or choose another --out")


def check_device(args, device):
    """What only the chosen device can rule out, checked before anything loads."""
    if device.type == "mps" and args.gradient_checkpointing and args.lora_dropout > 0:
        # torch.utils.checkpoint cannot replay MPS's random state, so the recomputed forward would
        # draw other dropout masks than the first one and the gradients would be wrong
        raise ValueError("--gradient-checkpointing with --lora-dropout does not work on mps (the recomputed "
                         "dropout would differ); drop one of them or use --device cpu")


# ----------------------------------------------------------------------------------------------
# 5. The curves: a plain SVG, two panels (loss; accuracy) over the epochs

def curves_svg(batch_losses, history, width=880, height=380) -> str:
    """Training loss per logged batch and validation loss per epoch (left), train and validation
    accuracy per epoch (right). Each polyline carries its values as JSON in data-values."""
    epochs = max(len(history), 1)
    top_loss = max([y for _, y in batch_losses] + [h["val_loss"] for h in history] + [1e-9]) * 1.05
    # (id, legend, points, colour, dash): training solid blue, validation dashed orange
    loss_series = [("train-loss", "training loss (per logged batch)", batch_losses, "#0072B2", ""),
                   ("val-loss", "validation loss", [(h["epoch"], h["val_loss"]) for h in history], "#D55E00", "6 4")]
    acc_series = [("train-acc", "training accuracy", [(h["epoch"], 100 * h["train_accuracy"]) for h in history],
                   "#0072B2", ""),
                  ("val-acc", "validation accuracy", [(h["epoch"], 100 * h["val_accuracy"]) for h in history],
                   "#D55E00", "6 4")]
    panels = [("Loss", "loss", top_loss, loss_series), ("Accuracy", "accuracy (%)", 100, acc_series)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="13"><rect width="100%" height="100%" fill="white"/>']
    w, h = width / 2 - 90, height - 150  # each plot area; margins hold the axes, title and legend
    for i, (title, ylabel, top, series) in enumerate(panels):
        x0, y0 = i * width / 2 + 65, 55  # the plot area's top-left corner

        def px(x, y):
            return x0 + w * x / epochs, y0 + h * (1 - y / top)
        out.append(f'<text x="{x0 + w / 2}" y="22" text-anchor="middle" font-size="15" '
                   f'font-weight="bold">{title}</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
        for k in range(6):  # five steps on the y axis, one tick per epoch on the x axis
            _, y = px(0, top * k / 5)
            value = f"{top * k / 5:.{0 if top >= 10 else 2}f}"
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{value}</text>')
        for e in range(epochs + 1):
            x, _ = px(e, 0)
            out.append(f'<text x="{x:.1f}" y="{y0 + h + 18}" text-anchor="middle">{e}</text>')
        out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 38}" text-anchor="middle">epoch</text>')
        out.append(f'<text transform="translate({x0 - 48},{y0 + h / 2}) rotate(-90)" '
                   f'text-anchor="middle">{ylabel}</text>')
        for j, (sid, label, points, colour, dash) in enumerate(series):
            pixels = " ".join("%.1f,%.1f" % px(x, y) for x, y in points)
            out.append(f'<polyline id="{sid}" data-values="{escape(json.dumps(points))}" points="{pixels}" fill="none" '
                       f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>')
            if sid != "train-loss":  # dots on the per-epoch series only
                out += [f'<circle cx="%.1f" cy="%.1f" r="3.5" fill="{colour}"/>' % px(x, y) for x, y in points]
            lx, ly = x0, y0 + h + 64 + 20 * j  # the legend: one row per series, under the axis
            out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" stroke="{colour}" stroke-width="2" '
                       f'stroke-dasharray="{dash}"/><text x="{lx + 30}" y="{ly}">{label}</text>')
        kept = [r["epoch"] for r in history if r.get("kept")]
        for e in kept:
            x, _ = px(e, 0)
            out.append(f'<line class="kept" x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + h}" stroke="#555" '
                       f'stroke-dasharray="2 3"/><text x="{x - 4:.1f}" y="{y0 + 14}" fill="#555" '
                       'text-anchor="end">kept</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


if __name__ == "__main__":
    main()
