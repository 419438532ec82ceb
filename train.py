"""Fine-tune GPT-2 with LoRA to classify SMS messages as spam or ham.

The recipe of Raschka's "Build a Large Language Model (From Scratch)", appendix E, done the
way its own experiments recommend: GPT-2 is frozen; LoRA adapters (Hu et al. 2021) go on every
Linear layer; the 50,257-way output head is replaced by a trainable 2-way one; and each message
is classified from the logits at its last real token, with batches padded only as far as needed.

Usage:
    python train.py --rank 16                         # downloads GPT-2 124M and the data once
    python train.py --model-dir DIR --data FILE       # offline
    python predict.py "You have won a prize, call now"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

import data
import gpt2
import lora

DEFAULT_OUT = "spam_lora.pt"


def add_classification_head(model: gpt2.GPTModel, num_classes: int):
    """Replace the 50,257-way LM head by a fresh, trainable (and no longer tied) num_classes-way one."""
    # Assigning a new module unties it from tok_emb; a fresh nn.Linear is trainable by default, so
    # after freeze_and_activate_lora the trainable set is exactly the LoRA matrices plus this head.
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, device=model.tok_emb.weight.device)


def logits_at_last_token(model, input_ids, last_index):
    """Class logits (B, num_classes) read at each message's last real token."""
    logits = model(input_ids)  # (B, T, num_classes)
    # Only the last real token has attended to the whole message (attention is causal); positions
    # after it are padding. Row b takes position last_index[b]: (B, T, K) -> (B, K).
    return logits[torch.arange(len(last_index), device=logits.device), last_index]


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU that supports it (the float32 LoRA and head weights stay float32)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.inference_mode()
def predict_loader(model, loader, device) -> tuple[list[int], list[int], list[float]]:
    """(predicted labels, true labels, spam probabilities) over a whole loader."""
    model.eval()
    preds, labels, spam_probs = [], [], []
    for input_ids, last_index, y in loader:
        with autocast_for(device):
            logits = logits_at_last_token(model, input_ids.to(device), last_index.to(device))
        probs = torch.softmax(logits.float(), dim=-1)  # (B, 2): P(ham), P(spam)
        preds += probs.argmax(-1).tolist()
        spam_probs += probs[:, 1].tolist()
        labels += y.tolist()
    return preds, labels, spam_probs


def binary_metrics(preds, labels) -> dict:
    """Accuracy, and precision / recall / F1 for the spam class, from the 2x2 confusion matrix."""
    # spam is the positive class: precision = how many flagged messages were spam, recall = how many
    # spam messages were flagged
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / max(len(labels), 1), "precision": precision, "recall": recall, "f1": f1,
            "confusion": {"ham_as_ham": tn, "ham_as_spam": fp, "spam_as_ham": fn, "spam_as_spam": tp}}


def train_step(model, optimizer, input_ids, last_index, labels, device):
    """One optimizer step on one batch; returns (loss, logits (B, 2))."""
    with autocast_for(device):
        logits = logits_at_last_token(model, input_ids, last_index)  # (B, 2)
    loss = nn.functional.cross_entropy(logits.float(), labels)  # the loss itself in float32
    # set_to_none: gradients are freed between steps instead of being zeroed and kept
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def train_epoch(model, loader, optimizer, device, epoch, log_every):
    """One pass over the training data; returns (average loss, training accuracy)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch, (input_ids, last_index, labels) in enumerate(loader):
        input_ids, last_index, labels = input_ids.to(device), last_index.to(device), labels.to(device)
        loss, logits = train_step(model, optimizer, input_ids, last_index, labels, device)
        total_loss += loss.item() * len(labels)  # batches differ in size: weight by messages
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
        if batch % log_every == 0:
            print(f"Epoch {epoch} | Batch {batch} | Loss: {loss.item():.4f}", flush=True)
    return total_loss / seen, correct / seen


def parse_args(argv=None):
    p = gpt2.ArgumentParser(prog="train.py", description="Fine-tune GPT-2 with LoRA to tell spam from ham.")
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
    p.add_argument("--seed", type=int, default=42, help="seed of the split, the batch order and the init")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    p.add_argument("--out", default=DEFAULT_OUT, help="adapter file to write; metrics go to <out>.metrics.json")
    p.add_argument("--eval-unused", action="store_true",
                   help="also report the false-positive rate on the ham messages left out by balancing")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every this many batches")
    args = p.parse_args(argv)
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.lr > 0 and math.isfinite(args.lr), "--lr must be a number > 0"),
        (args.weight_decay >= 0, "--weight-decay must be 0 or more"),
        (args.max_length is None or 1 <= args.max_length <= data.CONTEXT_LENGTH,
         f"--max-length must be between 1 and {data.CONTEXT_LENGTH}"),
        (args.log_every >= 1, "--log-every must be at least 1"),
        (Path(args.out).parent.is_dir(), f"--out {args.out}: folder {Path(args.out).parent} does not exist"),
        (not Path(args.out).is_dir(), f"--out {args.out} is a folder; give a file name such as {DEFAULT_OUT}"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    try:
        lora.check_lora_hparams(args.rank, args.alpha, args.lora_dropout)
        args.targets = lora.parse_targets(args.targets)
        args.model = gpt2.resolve_size(args.model)
    except ValueError as e:
        p.error(str(e))
    if args.alpha == int(args.alpha):
        args.alpha = int(args.alpha)  # 16, not 16.0, in the printout and the adapter file
    return args


def run(args):
    device = gpt2.pick_device(args.device)
    torch.manual_seed(args.seed)  # LoRA's A and the new head are the only random initialisations
    folder = gpt2.model_folder(args.model, args.model_dir, args.cache_dir, args.weights_source)
    model, tokenizer = gpt2.load_model_and_tokenizer(folder, device=device)
    messages, replaced = data.read_messages(data.data_path(args.data, args.cache_dir))
    if replaced:
        print(f"note: {replaced:,} invalid UTF-8 sequence(s) in the data were replaced by U+FFFD", file=sys.stderr)
    splits = data.split_dataset(messages, seed=args.seed)
    if not args.eval_unused:
        splits.pop("unused")  # 4,080 messages: not worth tokenizing unless asked for
    loaders = data.make_loaders(splits, tokenizer, batch_size=args.batch_size, seed=args.seed,
                                max_length=args.max_length, bucket=args.bucket,
                                context_length=model.cfg.context_length)
    max_length = loaders["train"].dataset.max_length
    print(f"Data: {len(splits['train']):,} train, {len(splits['val']):,} val, {len(splits['test']):,} test "
          f"messages; max length {max_length} tokens; device {device}")

    print(f"\nModel before LoRA (the first of {len(model.trf_blocks)} transformer blocks):")
    print(model.trf_blocks[0])
    lora.replace_linear_with_lora(model, args.rank, args.alpha, args.lora_dropout, targets=args.targets)
    lora.freeze_and_activate_lora(model)
    print("\nModel after LoRA:")
    print(model.trf_blocks[0])
    lora.print_trainable_parameters(model)
    add_classification_head(model, num_classes=len(data.LABELS))
    print("With the new classification head:")
    lora.print_trainable_parameters(model)
    print()

    # Only the trainable tensors go to the optimizer: the frozen 124M get no AdamW state at all
    # (AdamW keeps two extra tensors per parameter, which would triple the model's memory).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    history = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        avg_loss, train_acc = train_epoch(model, loaders["train"], optimizer, device, epoch, args.log_every)
        val = binary_metrics(*predict_loader(model, loaders["val"], device)[:2])
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "avg_loss": avg_loss, "train_accuracy": train_acc,
                        "val_accuracy": val["accuracy"], "seconds": seconds})
        print(f"Epoch {epoch} Finished | Avg Loss: {avg_loss:.4f} | Acc: {100 * train_acc:.2f}% | "
              f"Val Acc: {100 * val['accuracy']:.2f}% | Time: {seconds:.2f}s", flush=True)

    test = binary_metrics(*predict_loader(model, loaders["test"], device)[:2])
    c = test["confusion"]
    print(f"\nTest Set Accuracy: {100 * test['accuracy']:.2f}%")
    print(f"Spam precision: {test['precision']:.4f} | recall: {test['recall']:.4f} | F1: {test['f1']:.4f}")
    print("Confusion matrix (rows: true label, columns: predicted):")
    print(f"{'':>10}{'ham':>8}{'spam':>8}\n{'ham':>10}{c['ham_as_ham']:>8,}{c['ham_as_spam']:>8,}\n"
          f"{'spam':>10}{c['spam_as_ham']:>8,}{c['spam_as_spam']:>8,}")
    metrics = {"history": history, "test": test}
    if args.eval_unused:
        preds, _, _ = predict_loader(model, loaders["unused"], device)
        false_pos = sum(preds)
        metrics["unused"] = {"messages": len(preds), "false_positives": false_pos,
                             "false_positive_rate": false_pos / len(preds)}
        print(f"False positives on the {len(preds):,} unused ham messages: {false_pos:,} "
              f"({100 * false_pos / len(preds):.2f}%)")

    # the size name predict.py would download if the folder is gone; from the folder's own shape
    size = next((name for name, cfg in gpt2.GPT2_SIZES.items() if cfg == model.cfg), args.model)
    meta = {"model": size, "model_dir": str(folder.resolve()), "weights_source": args.weights_source,
            "config": asdict(model.cfg), "targets": list(args.targets) if args.targets else "all",
            "max_length": max_length, "labels": list(data.LABELS), "seed": args.seed}
    out = Path(args.out)
    lora.save_adapter(model, out, meta)  # only A, B and the head: 10.7 MB for rank 16 on 124M
    metrics["args"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    gpt2.atomic_write(out.with_name(out.name + ".metrics.json"), json.dumps(metrics, indent=2) + "\n")
    print(f"\nSaved the adapter to {out} ({out.stat().st_size / 1e6:.1f} MB) and metrics to {out}.metrics.json")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print(f"\ntrain.py: interrupted; nothing was saved (an existing {args.out} is untouched)", file=sys.stderr)
        sys.exit(130)  # the shell's code for "stopped by Ctrl-C"
    except (ValueError, OSError, gpt2.DownloadError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
