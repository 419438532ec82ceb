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
import hashlib
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

import numpy as np
import torch
import torch.nn as nn

import data
import formats
import gpt2
import lora

DEFAULT_OUT = "spam_lora.safetensors"
# The files beside --out, each with a mark that shows train.py wrote it (an existing one may be replaced)
SIDECARS = {".metrics.json": '"run_id"', ".curves.svg": 'id="train-loss"'}
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the validation report shows precision and recall


# ----------------------------------------------------------------------------------------------
# 1. Training: one step, one epoch, the whole fit

def train_step(model, optimizer, batches, precision="fp32", max_grad_norm=None, scheduler=None):
    """One optimizer step on one batch, or on several whose gradients add up (--grad-accum): the
    loss is the mean over all their messages, as one batch of them all would give. Each batch is
    (input_ids, last_index, labels); returns [(loss, logits (B, 2))] of each."""
    # set_to_none: gradients are freed between steps instead of being zeroed and kept
    optimizer.zero_grad(set_to_none=True)
    total, out = sum(len(labels) for *_, labels in batches), []
    for input_ids, last_index, labels in batches:
        with cli.autocast_for(input_ids.device, precision):
            logits = gpt2.logits_at_last_token(model, input_ids, last_index)  # (B, 2), float32
        loss = nn.functional.cross_entropy(logits, labels)  # the loss itself in float32
        (loss * (len(labels) / total)).backward()  # this batch's share of the step's mean loss
        out.append((loss, logits))
    if max_grad_norm is not None:  # rescale all gradients together when their norm is larger
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out


def train_epoch(model, loader, optimizer, device, epoch, args, precision="fp32", clock=None, scheduler=None):
    """One pass over the training data; returns (average loss, accuracy, [(batch, loss) logged]).

    clock: the start time and batch counts that eta needs."""
    model.train()
    total_loss, correct, seen, logged = 0.0, 0, 0, []
    for first, batches in _steps(loader, args.grad_accum):
        batches = [tuple(t.to(device) for t in batch) for batch in batches]
        results = train_step(model, optimizer, batches, precision, args.max_grad_norm, scheduler)
        for batch, (_, _, labels), (loss, logits) in zip(range(first, first + len(batches)), batches, results):
            value = loss.item()
            if not math.isfinite(value):
                raise ValueError(f"the loss became {value} in epoch {epoch}, batch {batch}; training stopped and "
                                 "the adapter was not saved. Try a smaller --lr (and delete the checkpoint beside "
                                 "--out, which keeps the last good epoch, to start over)")
            total_loss += value * len(labels)  # batches differ in size: weight by messages
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
            if batch % args.log_every == 0:
                logged.append((batch, value))
                print(f"Epoch {epoch} | Batch {batch}/{len(loader)} | Loss: {value:.4f}{eta(clock, batch + 1)}",
                      flush=True)
    return total_loss / seen, correct / seen, logged


def _steps(loader, accumulate):
    """(index of the first batch, [accumulate batches]) for each optimizer step of one epoch."""
    group, first = [], 0
    for i, batch in enumerate(loader):
        group.append(batch)
        if len(group) == accumulate:
            yield first, group
            group, first = [], i + 1
    if group:  # the epoch's last, shorter step
        yield first, group


def fit(model, loaders, args, device, precision, fingerprint=None, resume_from=None):
    """Train for args.epochs; keep the adapter of the best (lowest validation loss) or last epoch.
    Returns (history, logged batch losses as (epoch progress, loss), the kept epoch).

    Given the run's fingerprint (run_fingerprint), the whole state of the run is saved after every
    epoch as a checkpoint beside --out, from which train.py --resume continues (resume_from: what
    find_checkpoint read)."""
    # Only the trainable tensors go to the optimizer: the frozen 124M get no AdamW state at all
    # (AdamW keeps two extra tensors per parameter, which would triple the model's memory).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    n, steps_per_epoch = len(loaders["train"]), -(-len(loaders["train"]) // args.grad_accum)
    progress, kept = {"epoch": 0, "history": [], "curve": [], "best": math.inf}, None
    if resume_from:
        progress, kept = restore_checkpoint(resume_from, model, optimizer, loaders["train"])
    scheduler = lr_scheduler(optimizer, args, steps_per_epoch * args.epochs, done=progress["epoch"] * steps_per_epoch)
    history, curve = progress["history"], progress["curve"]
    clock = (time.perf_counter(), n * progress["epoch"], n * args.epochs)
    for epoch in range(progress["epoch"] + 1, args.epochs + 1):
        if stalled(history, args.patience):
            break
        start = time.perf_counter()
        avg_loss, train_acc, logged = train_epoch(model, loaders["train"], optimizer, device, epoch,
                                                  args, precision, (*clock, n * (epoch - 1)), scheduler)
        curve += [(epoch - 1 + (batch + 1) / n, loss) for batch, loss in logged]
        labels, probs, val_loss = spam_probabilities(model, loaders["val"], device, precision)
        if not math.isfinite(val_loss):
            raise ValueError(f"the validation loss became {val_loss} in epoch {epoch}; training stopped and "
                             "the adapter was not saved. Try a smaller --lr (and delete the checkpoint beside "
                             "--out, which keeps the last good epoch, to start over)")
        val_acc = binary_metrics(labels, probs, args.threshold)["accuracy"]
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "avg_loss": avg_loss, "train_accuracy": train_acc, "val_loss": val_loss,
                        "val_accuracy": val_acc, "seconds": seconds})
        print(f"Epoch {epoch} Finished | Avg Loss: {avg_loss:.4f} | Acc: {100 * train_acc:.2f}% | "
              f"Val Acc: {100 * val_acc:.2f}% | Time: {seconds:.2f}s", flush=True)
        kept = keep_if_better(model, args.keep, progress, kept)
        progress["epoch"] = epoch
        if fingerprint is not None:  # train.py's runs; a caller of fit alone gets no checkpoint files
            write_checkpoint(args, fingerprint, model, optimizer, loaders["train"], progress, kept)
    with torch.no_grad():
        for name, param in lora.adapter_state(model).items():
            param.copy_(kept[name])
    kept_epoch = next(h["epoch"] for h in history if h.get("kept"))
    if stalled(history, args.patience) and len(history) < args.epochs:
        print(f"Stopped early: the validation loss has not improved for {args.patience} epoch(s) (--patience)")
    print(f"Kept the adapter of epoch {kept_epoch} ({'lowest validation loss' if args.keep == 'best' else 'the last'})")
    return history, curve, kept_epoch


def keep_if_better(model, keep, progress, kept):
    """After an epoch: a copy of what the adapter file would hold, if this epoch is the one to keep
    (--keep best: the lowest validation loss so far; last: every epoch); the history marks it."""
    history = progress["history"]
    if keep == "last" or history[-1]["val_loss"] < progress["best"]:
        progress["best"], kept = history[-1]["val_loss"], {k: v.detach().clone() for k, v in
                                                          lora.adapter_state(model).items()}
        for h in history:
            h.pop("kept", None)
        history[-1]["kept"] = True
    return kept


def lr_scheduler(optimizer, args, steps: int, done=0):
    """The learning rate over the run's `steps` optimizer steps: a linear warm-up from 0 over
    --warmup-steps, then constant, or decaying to 0 at the last step (linear, or a half cosine).
    None for the course's constant rate, which then stays exactly args.lr. done: steps already
    taken (by the run that --resume continues), so that the rate is where that run left it."""
    if args.lr_schedule == "constant" and args.warmup_steps == 0:
        return None
    warmup = args.warmup_steps

    def factor(step):  # times args.lr, at optimizer step `step` (0, 1, ...)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)  # 0 -> 1 over the rest of the run
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[args.lr_schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.last_epoch = done
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor(done)
    return scheduler


def stalled(history, patience) -> bool:
    """--patience: whether the last `patience` epochs all failed to beat the best validation loss."""
    if not patience or len(history) <= patience:
        return False
    best = min(h["val_loss"] for h in history[:-patience])
    return all(h["val_loss"] >= best for h in history[-patience:])


ETA_AFTER = (5, 3.0)  # batches and seconds: a pace from fewer says little


def eta(clock, batches_done_now) -> str:
    """' | 0:42 left' for the whole run, from the pace of the batches run since this process started,
    once there are a few of them (ETA_AFTER).

    clock: (start time, batches done before it, batches in the whole run, batches before this epoch)."""
    if clock is None:
        return ""
    start, done_at_start, total, done_before = clock
    done, elapsed = done_before + batches_done_now, time.perf_counter() - start
    if done - done_at_start < ETA_AFTER[0] or elapsed < ETA_AFTER[1]:
        return ""
    left = elapsed / (done - done_at_start) * (total - done)
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
            print(f"Evaluating {name} | Batch {batch}/{len(loader)}{eta((started, 0, len(loader), 0), batch)}",
                  flush=True)
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
    test_labels, test_probs, _ = spam_probabilities(model, loaders["test"], device, precision)
    test = {**binary_metrics(test_labels, test_probs, args.threshold), "roc_auc": roc_auc(test_labels, test_probs)}
    c = test["confusion"]
    print(f"\nTest Set Accuracy: {100 * test['accuracy']:.2f}%")
    test_auc = test["roc_auc"]
    print(f"Test ROC AUC: {test_auc:.4f}" if test_auc is not None else "Test ROC AUC: undefined (one class)")
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
    resume_from = find_checkpoint(args)  # before anything loads: a stopped run is never overwritten
    model, folder, loaders, precision = build(args, device, resume_from)
    fingerprint = run_fingerprint(args, loaders, model, precision)
    if resume_from:
        check_checkpoint(resume_from, fingerprint)
    # which run owns the checkpoint: a second run with the same --out must not write over it
    fingerprint["run"] = resume_from[0]["fingerprint"]["run"] if resume_from else secrets.token_hex(8)
    history, curve, kept_epoch = fit(model, loaders, args, device, precision, fingerprint, resume_from)
    metrics = evaluate(model, loaders, args, device, precision)
    save(model, folder, loaders, args, precision, {"history": history, "kept_epoch": kept_epoch, **metrics}, curve,
         fingerprint["run"])


def build(args, device, resume_from=None):
    """The model, its tokenizer, the data loaders and the precision: everything before training."""
    torch.manual_seed(args.seed)  # LoRA's A and the new head are the only random initialisations
    if resume_from and args.precision == "auto":  # the precision of the run that stopped, not a new probe
        precision, why = resume_from[0]["fingerprint"]["precision"], "as in the run that is resumed"
    else:
        precision, why = cli.choose_precision(args.precision, device)
    data_file, folder = cli.fetch_all(lambda: data.data_path(args.data, args.cache_dir),
                                      lambda: gpt2.model_folder(args.model, args.model_dir, args.cache_dir,
                                                                args.weights_source))
    messages, notes = data.read_messages(data_file)  # a --data typo before the model loads
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
    # room for the adapter and the checkpoint: its weights, the kept copy and AdamW's two moments, float32
    check_out(args, need=5 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) + 2**24)
    print("\nModel after LoRA:")
    print(model.trf_blocks[0])
    lora.print_trainable_parameters(model, skip=("out_head",))  # the counts before the new head
    print("With the new classification head:")
    lora.print_trainable_parameters(model)
    print()
    return model, folder, loaders, precision


def save(model, folder, loaders, args, precision, metrics, curve, run_owner=None):
    """The adapter, its metrics and its curves, all with one run id: each is written in full and
    fsynced first, then the three are renamed into place together (stop signals held back, the
    folder locked against another run), so a full disk or a kill replaces nothing and a reader
    never finds a new adapter beside another run's metrics. Then this run's checkpoint goes."""
    out = Path(args.out)
    run_id = secrets.token_hex(8)
    # the size name predict.py would download if the folder is gone; from the folder's own shape
    size = next((name for name, cfg in gpt2.GPT2_SIZES.items() if cfg == model.cfg), args.model)
    meta = {"model": size, "model_dir": str(folder.resolve()), "downloaded": args.model_dir is None,
            "weights_source": args.weights_source, "base_fingerprint": model.weights_fingerprint,
            "config": {k: v for k, v in asdict(model.cfg).items() if k in gpt2.CONFIG_BOUNDS},
            "targets": list(args.targets) if args.targets else "all", "max_length": loaders["train"].dataset.max_length,
            "labels": list(data.LABELS), "threshold": args.threshold, "precision": precision, "seed": args.seed,
            "kept_epoch": metrics["kept_epoch"], "run_id": run_id}
    metrics = {"run_id": run_id, "precision": precision, **metrics,
               "args": args_as_json(args)}
    files = {out.with_name(out.name + ".metrics.json"): json.dumps(metrics, indent=2) + "\n",
             out.with_name(out.name + ".curves.svg"): curves_svg(curve, metrics["history"], run_id),
             out: lora.adapter_writer(model, meta, out)}  # only A, B and the head: 10.6 MB for rank 16 on 124M
    with cli.interrupts_deferred() as interrupted:  # until the last line about it is printed
        cli.atomic_write_all(files)
        if checkpoint_owner(checkpoint_path(args)) == run_owner:  # the run is complete: nothing to resume
            checkpoint_path(args).unlink(missing_ok=True)
            cli.fsync_folder(out.parent)
        print(f"\nSaved the adapter to {out} ({out.stat().st_size / 1e6:.1f} MB), metrics to {out}.metrics.json "
              f"and curves to {out}.curves.svg", flush=True)
    if interrupted:
        sys.stderr.write("train.py: interrupted just as the adapter was being saved; it was saved\n")
        sys.exit(128 + interrupted[0])


# ----------------------------------------------------------------------------------------------
# 3b. Checkpoints: a stopped run continues with --resume, exactly as if it had never stopped
#
# One safetensors file beside --out, rewritten (atomically, durably) after every epoch: the LoRA
# and head weights, AdamW's moments, the random states (dropout, the batch order), the kept
# adapter and the history so far, and a fingerprint of what must not change between the two
# runs: the data split, the base weights and every argument that changes the numbers.

CHECKPOINT_FORMAT = "gpt2-lora-checkpoint"
# Arguments that may differ on --resume: they change where files are or what is printed, not the numbers
FREE_ARGS = {"log_every", "eval_unused", "device", "resume", "gradient_checkpointing", "out",
             "data", "model_dir", "cache_dir", "model", "weights_source", "precision"}


def args_as_json(args) -> dict:
    """The parsed arguments as JSON values (--targets is a tuple)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def checkpoint_path(args) -> Path:
    return Path(args.out).with_name(Path(args.out).name + ".checkpoint")


def run_fingerprint(args, loaders, model, precision) -> dict:
    """What a checkpoint must match: the arguments that change the numbers, the split, the base."""
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        dataset = loaders[name].dataset
        digest.update(json.dumps([name, dataset.encoded, dataset.labels]).encode())
    values = {k: v for k, v in args_as_json(args).items() if k not in FREE_ARGS}
    return {**values, "precision": precision, "data split": digest.hexdigest()[:32],
            "base weights": model.weights_fingerprint}


def _batch_order(loader) -> torch.Generator:
    """The generator that draws the training batches' order (bucketed or not)."""
    return getattr(loader.batch_sampler, "generator", None) or loader.generator


def write_checkpoint(args, fingerprint, model, optimizer, loader, progress, kept):
    path = checkpoint_path(args)
    if path.exists() and checkpoint_owner(path) != fingerprint["run"]:
        raise ValueError(f"another train.py run is writing its checkpoint to {path} (the same --out); this run "
                         "stopped so as not to write over it: give the two runs different --out names")
    tensors = {f"adapter/{k}": v for k, v in lora.adapter_state(model).items()}
    tensors.update({f"kept/{k}": v for k, v in kept.items()})
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"adam/{i}/{k}": v for k, v in state.items()})  # step, exp_avg, exp_avg_sq
    tensors["rng/torch"], tensors["rng/batches"] = torch.get_rng_state(), _batch_order(loader).get_state()
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    meta = {"format": CHECKPOINT_FORMAT, "progress": json.dumps(progress), "fingerprint": json.dumps(fingerprint),
            "sha256": _digest(arrays)}
    cli.atomic_write(path, formats.safetensors_writer(arrays, metadata=meta))
    print(f"Saved a checkpoint of epoch {progress['epoch']} to {path} (if this run stops, "
          "continue it: the same command with --resume)", flush=True)


def find_checkpoint(args):
    """With --resume: the checkpoint's (metadata, tensors); without: None, after making sure that no
    stopped run's checkpoint would be overwritten."""
    path = checkpoint_path(args)
    if not args.resume:
        if path.exists():
            raise ValueError(f"a stopped run left a checkpoint at {path}; continue it with the same command and "
                             "--resume, or delete that file to start over")
        return None
    if not path.is_file():
        raise ValueError(f"--resume: there is no checkpoint at {path} (it is written after each epoch and removed "
                         "once the adapter is saved); run without --resume")
    try:
        arrays, meta = formats.read_safetensors(path, with_metadata=True)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a checkpoint written by train.py")
        if meta.get("sha256") != _digest(arrays):
            raise ValueError("its tensors are not the bytes that were written (sha256 differs)")
        meta = {"progress": json.loads(meta["progress"]), "fingerprint": json.loads(meta["fingerprint"])}
    except (formats.CheckpointError, ValueError, KeyError, RecursionError) as e:
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({str(e)[:100]}); delete it to start "
                         "over") from None
    return meta, {k: torch.from_numpy(np.array(a)) for k, a in arrays.items()}


def _digest(arrays) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def checkpoint_owner(path: Path):
    """The run token in a checkpoint's header (cheap: its tensors are not read), or None."""
    try:
        meta = formats.read_safetensors_header(path)[1]
        return json.loads(meta["fingerprint"]).get("run")
    except (OSError, formats.CheckpointError, ValueError, KeyError, AttributeError):
        return None


def check_checkpoint(checkpoint, fingerprint: dict):
    """Refuse a checkpoint of another run, saying what differs."""
    saved = checkpoint[0]["fingerprint"]
    differ = [f"{k} {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in fingerprint.items() if saved.get(k) != v]
    if differ:
        raise ValueError(f"--resume: the checkpoint {'; '.join(differ[:3])}; run the command the checkpoint was made "
                         "with, or delete the checkpoint to start over")


def restore_checkpoint(checkpoint, model, optimizer, loader):
    """Put the model, AdamW and the random states back as they were; return (progress, kept)."""
    tensors, progress = checkpoint[1], checkpoint[0]["progress"]
    progress["best"] = float(progress["best"])  # JSON's Infinity while no epoch was kept
    with torch.no_grad():
        for name, param in lora.adapter_state(model).items():
            param.copy_(tensors[f"adapter/{name}"])
    state = optimizer.state_dict()
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("adam/"):
            _, i, name = key.split("/")
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng/torch"])
    _batch_order(loader).set_state(tensors["rng/batches"])
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"rng/cuda/{i}" in tensors:  # the GPUs both runs can see
            torch.cuda.set_rng_state(tensors[f"rng/cuda/{i}"], i)
    kept = {k.removeprefix("kept/"): v for k, v in tensors.items() if k.startswith("kept/")}
    progress["curve"] = [tuple(point) for point in progress["curve"]]
    print(f"Resumed a stopped run after its epoch {progress['epoch']}", flush=True)
    return progress, kept


# ----------------------------------------------------------------------------------------------
# 4. The command line, every argument checked before anything loads

def main(argv=None):
    args = None

    def command():
        nonlocal args
        args = parse_args(argv)
        run(args)

    def interrupted():  # what a stop leaves behind
        if args is not None and checkpoint_path(args).is_file():
            return (f"interrupted; the adapter was not saved, but {checkpoint_path(args)} holds the run up to its "
                    "last finished epoch: the same command with --resume continues it")
        return "interrupted; nothing was saved (an existing adapter is untouched)"
    cli.run_cli(command, "train.py", expected=(data.DataError,), interrupted=interrupted, finish_without_stdout=True,
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
    p.add_argument("--batch-size", type=int, default=8, help="messages per batch (one forward and backward pass)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="batches per optimizer step, their gradients summed: an effective batch of "
                        "batch-size x grad-accum messages in the memory of one batch")
    p.add_argument("--lr", type=float, default=8e-4, help="AdamW learning rate")
    p.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="the learning rate after the warm-up: constant, or decaying linearly or along a half "
                        "cosine towards 0 at the end of the run")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="optimizer steps over which the learning rate rises linearly to --lr (step k of w uses "
                        "(k+1)/(w+1) of it)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradients' global norm to this before each step (off by default; "
                        "Hugging Face's Trainer uses 1.0)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop once the validation loss has not improved for this many epochs (off by default); "
                        "the kept epoch is still the best one")
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
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run from the checkpoint beside --out (written after every epoch)")
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
        (1 <= args.grad_accum <= 65_536, "--grad-accum must be at least 1 and at most 65,536"),
        (0 <= args.warmup_steps <= 10**9, "--warmup-steps must be 0 or more"),
        (args.max_grad_norm is None or (math.isfinite(args.max_grad_norm) and args.max_grad_norm > 0),
         "--max-grad-norm must be a number > 0"),
        (args.patience is None or 1 <= args.patience <= 100_000, "--patience must be at least 1"),
        (0 <= args.seed < 2**63, "--seed must be between 0 and 2**63 - 1"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    try:
        lora.check_lora_hparams(args.rank, args.alpha, args.lora_dropout)
        args.targets = lora.parse_targets(args.targets)
        args.model = gpt2.resolve_size(args.model)
        check_out(args)
    except ValueError as e:
        p.error(str(e))
    if args.alpha == int(args.alpha):
        args.alpha = int(args.alpha)  # 16, not 16.0, in the printout and the adapter file


def check_out(args, need=8 * 2**20):
    """--out must be a new file or an earlier adapter, never one of this run's inputs, in a folder we
    can write on a disk with `need` bytes free: found now, not after the whole training (build checks
    again once the adapter's size is known)."""
    if not args.out.strip():
        raise ValueError(f"--out is empty; give a file name such as {DEFAULT_OUT}")
    out = Path(args.out)
    folder = out.parent
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise ValueError(f"--out {out} is a folder or a device; give a file name such as {DEFAULT_OUT}")
    if not folder.is_dir():
        raise ValueError(f"--out {out}: folder {folder} does not exist; create it or choose another --out")
    check_not_an_input(args, out)
    probe = folder / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.probe"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {folder} ({e.strerror}); choose another --out") from None
    if shutil.disk_usage(folder).free < need:
        raise ValueError(f"--out {out}: less than {need / 1e6:,.0f} MB free in {folder} (the adapter and its "
                         "metrics need that); free some space or choose another --out")


def check_not_an_input(args, out: Path):
    """None of the files train.py writes may be the data file or lie in the model folder, and --out
    may replace an earlier adapter, but no other file."""
    model_dir = Path(args.model_dir) if args.model_dir else gpt2.download_folder(args.model, args.cache_dir,
                                                                                   args.weights_source)
    data_file = Path(args.data) / data.SMS_MEMBER if args.data and Path(args.data).is_dir() else args.data
    for path in (out, *(out.with_name(out.name + suffix) for suffix in (*SIDECARS, ".checkpoint"))):
        if data_file and path.resolve() == Path(data_file).resolve():
            raise ValueError(f"--out {out} would overwrite the training data {data_file}; choose another name")
        if model_dir.resolve() in path.resolve().parents:
            raise ValueError(f"--out {out} would write into the model folder {model_dir}; choose a name outside it")
    if out.exists() and not lora.is_adapter(out):
        raise ValueError(f"--out {out} is an existing file that is not an adapter made by train.py; choose "
                         "another name (or delete the file first)")
    for suffix, mark in SIDECARS.items():
        sidecar = out.with_name(out.name + suffix)  # replaced too: it must be one that train.py wrote
        if sidecar.exists() and (not sidecar.is_file() or mark not in sidecar.read_text(errors="replace")):
            raise ValueError(f"--out {out}: {sidecar} exists and was not written by train.py; choose another "
                             "--out (or delete that file first)")


def check_device(args, device):
    """What only the chosen device can rule out, checked before anything loads."""
    if device.type == "mps" and args.gradient_checkpointing and args.lora_dropout > 0:
        # torch.utils.checkpoint cannot replay MPS's random state, so the recomputed forward would
        # draw other dropout masks than the first one and the gradients would be wrong
        raise ValueError("--gradient-checkpointing with --lora-dropout does not work on mps (the recomputed "
                         "dropout would differ); drop one of them or use --device cpu")


# ----------------------------------------------------------------------------------------------
# 5. The curves: a plain SVG, two panels (loss; accuracy) over the epochs

def curves_svg(batch_losses, history, run_id="", width=880, height=380) -> str:
    """Training loss per logged batch and validation loss per epoch (left), train and validation
    accuracy per epoch (right). Each polyline carries its values as JSON in data-values, and the
    picture the run's id in data-run-id, as the adapter and the metrics do."""
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
           f'font-size="13" data-run-id="{escape(run_id)}"><rect width="100%" height="100%" fill="white"/>']
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
