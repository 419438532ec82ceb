"""Classify SMS messages as spam or ham with an adapter that train.py made.

The adapter file names its base model; predict.py loads that GPT-2 (memory-mapped, no random
init), builds the same LoRA classifier, loads the adapter, and merges the LoRA update into the
weights (W <- W + (alpha/r) (A B)^T) so that inference costs no more than the base model.
Messages are batched by length; a message is spam when P(spam) >= the adapter's threshold. With
"-", stdin is read as a stream: lines are classified as they arrive and each batch's results are
printed at once, so predict.py works as a filter on a pipe that stays open.

Usage:
    python predict.py "There is a big cash prize for you, call immediately."
    python predict.py --json "msg one" "msg two"
    cat messages.txt | python predict.py -          # one message per line
    tail -f sms.log | python predict.py --json -    # a filter: results as lines arrive
    python predict.py -- -                          # the message "-" itself
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.exit_on_signals_while_importing("predict.py")  # torch takes about 2 s to import

import json
import math
import queue
import sys
import threading
from pathlib import Path

import torch

import data
import gpt2
import lora

DEFAULT_ADAPTER = "spam_lora.safetensors"


def load_classifier(adapter_path, model_dir=None, cache_dir=None, device="cpu", precision="fp32"):
    """(merged model, tokenizer, adapter metadata) ready for inference."""
    adapter_path = Path(adapter_path)
    if not adapter_path.exists():
        old = adapter_path.with_suffix(".pt")
        hint = ""
        if old.exists() and old != adapter_path:
            hint = f" ({old} is of the old pickle format, which is no longer read)"
        raise FileNotFoundError(f"no trained adapter at {adapter_path} — run python train.py first{hint}")
    meta, tensors = lora.read_adapter(adapter_path)
    folder = base_model_folder(adapter_path, meta, model_dir, cache_dir)
    model, tokenizer = gpt2.load_model_and_tokenizer(folder, device=device)  # float32: merged in full precision
    check_base_model(adapter_path, meta, model, folder)
    if meta["max_length"] > model.cfg.context_length:
        raise ValueError(f"{adapter_path}: max_length {meta['max_length']} exceeds the model's context")
    lora.build_classifier(model, len(meta["labels"]), meta["rank"], meta["alpha"], meta["dropout"],
                          targets=None if meta["targets"] == "all" else meta["targets"])
    lora.load_adapter(model, adapter_path, adapter=(meta, tensors))
    lora.merge_lora(model)  # W <- W + (alpha/r) (A B)^T: from here on it is a plain GPT-2
    if precision == "bf16":  # cast once, after the merge was formed in float32
        gpt2.cast_matmuls(model, torch.bfloat16)
    return model.requires_grad_(False).eval(), tokenizer, meta


def base_model_folder(adapter_path, meta, model_dir=None, cache_dir=None) -> Path:
    """--model-dir, else the folder the adapter was trained on; a download only where training
    downloaded it too, never in place of a local folder that is gone."""
    recorded = meta.get("model_dir") if isinstance(meta.get("model_dir"), str) else None
    source = meta.get("weights_source") if meta.get("weights_source") in ("openai", "hf") else "openai"
    size = meta.get("model", "124M")
    if model_dir is None and recorded and Path(recorded).is_dir():
        model_dir = recorded
    elif model_dir is None and recorded and not _was_downloaded(meta, recorded):
        raise ValueError(f"{adapter_path} was trained on the model in {recorded}, which is gone; "
                         "pass --model-dir with that model's folder")
    if model_dir is None and not isinstance(size, str):
        raise ValueError(f"{adapter_path}: adapter metadata model is {size!r:.40}, not a GPT-2 size; give --model-dir")
    return gpt2.model_folder(size, model_dir, cache_dir, source)


def _was_downloaded(meta, recorded: str) -> bool:
    if "downloaded" in meta:
        return meta["downloaded"] is True
    # adapters written before "downloaded" was recorded: the cache's own folder names
    return Path(recorded).parent.name in ("gpt2", "gpt2-hf") and Path(recorded).name == meta.get("model")


def check_base_model(adapter_path, meta, model, folder):
    """The base weights must be the ones the adapter was trained on: the same shape, and (for adapters
    that record it) the same fingerprint of the weights' values."""
    trained_on = {k: meta["config"][k] for k in gpt2.CONFIG_BOUNDS}
    if trained_on != {k: getattr(model.cfg, k) for k in gpt2.CONFIG_BOUNDS}:
        raise ValueError(f"{adapter_path} was trained on another base model ({trained_on}); {folder} holds "
                         f"{model.cfg}. Point --model-dir at the model it was trained on")
    expected = meta.get("base_fingerprint")
    if expected is None:
        print(f"note: {adapter_path} does not record which base weights it was trained on (it predates that "
              "check), so they cannot be checked", file=sys.stderr)
    elif expected != model.weights_fingerprint:
        raise ValueError(f"{adapter_path} was trained on base weights with fingerprint {expected}, but {folder} "
                         f"holds weights with fingerprint {model.weights_fingerprint}; point --model-dir at the "
                         "model it was trained on")


@torch.inference_mode()
def classify(model, pad_id, encoded, max_length, device, precision="fp32", batch_size=32) -> list[float]:
    """Spam probability of each tokenized message, in order; batched by length and right-padded."""
    encoded = [ids[:max_length] for ids in encoded]  # the first max_length tokens, as in training
    # batching by length keeps padding small; the results are the same in any order (causal attention)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    spam = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, last_index, _ = data.collate([(encoded[i], 0) for i in rows], pad_id=pad_id)
        with cli.autocast_for(device, precision):
            logits = gpt2.logits_at_last_token(model, input_ids.to(device), last_index.to(device))  # (B, 2)
        for i, p in zip(rows, torch.softmax(logits, dim=-1)[:, 1].tolist()):  # P(spam)
            spam[i] = p
    return spam


def message_groups(args_texts, literal, stdin, window, counts):
    """Lists of (stdin line number or None, text) to classify together, in input order: the
    arguments; "-" stands for stdin, one message per line, streamed (see stdin_windows). literal:
    the arguments given after "--", taken as they are, "-" included."""
    group = []
    for arg in args_texts:
        if arg != "-":
            group.append((None, _from_argv(arg)))
            continue
        if group:
            yield group
            group = []
        if stdin is None or stdin.closed:
            raise ValueError('stdin is closed, so "-" has nothing to read; pipe messages in or give them '
                             "as arguments")
        yield from stdin_windows(stdin.buffer, window, counts)
        if not counts["messages"]:
            blank = f" (only {counts['blank']:,} blank line(s))" if counts["blank"] else ""
            raise ValueError(f'no messages were given on stdin ("-"){blank}; pipe in one message per line')
    group += [(None, _from_argv(text)) for text in literal]
    if group:
        yield group


def _from_argv(arg: str) -> str:
    # arguments the OS could not decode arrive as surrogates; make them U+FFFD instead
    return arg.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")


IDLE_WAIT = 0.05  # seconds without a new line after which what has arrived is classified


def stdin_windows(stream, window, counts):
    """Yield lists of (line number, text) of the non-blank lines of a binary stream as they arrive:
    a list is full at `window` lines, or ends when no new line came for IDLE_WAIT seconds. A thread
    reads ahead at most `window` lines, so memory stays flat for any number of lines. Only "\\n" ends a line
    (a U+2028 inside a message stays in it); bad UTF-8 is replaced. counts: "messages" and
    "blank" lines seen so far."""
    lines = queue.Queue(maxsize=window)
    threading.Thread(target=_read_lines, args=(stream, lines), daemon=True).start()
    batch = []
    while True:
        try:  # wait as long as it takes for a first line, then only IDLE_WAIT for the next
            item = lines.get(timeout=IDLE_WAIT) if batch else lines.get()
        except queue.Empty:
            yield batch
            batch = []
            continue
        if isinstance(item, BaseException):
            raise item
        if item is None:  # the end of the input
            break
        n, raw = item
        text = raw.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")
        if not text.strip():
            counts["blank"] += 1
            continue
        counts["messages"] += 1
        batch.append((n, text))
        if len(batch) == window:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_lines(stream, lines):
    try:
        for n, raw in enumerate(iter(stream.readline, b""), start=1):
            lines.put((n, raw))
        lines.put(None)
    except BaseException as e:  # whatever stops the reading (a MemoryError too) must reach the main thread
        lines.put(e)


def parse_args(argv):
    p = cli.ArgumentParser(prog="predict.py", description="Tell spam from ham with a trained LoRA adapter.")
    p.add_argument("messages", nargs="+", help='messages to classify; "-" reads one message per line from stdin; '
                                               'after "--" every argument is a message, "-" included')
    p.add_argument("--adapter", default=DEFAULT_ADAPTER, help="adapter file written by train.py")
    p.add_argument("--json", action="store_true", help="print one JSON object per message")
    p.add_argument("--threshold", type=float, default=None,
                   help="call a message spam when P(spam) >= this (default: the threshold stored in the adapter)")
    p.add_argument("--model-dir", default=None, help="base model folder (default: the one named in the adapter)")
    p.add_argument("--cache-dir", default=None, help="download cache (see gpt2.py --help)")
    p.add_argument("--batch-size", type=int, default=32, help="messages per forward pass")
    p.add_argument("--device", default="auto", help=cli.DEVICE_HELP)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help=cli.PRECISION_HELP)
    args = p.parse_args(argv)
    if not 1 <= args.batch_size <= 65_536:
        p.error("--batch-size must be between 1 and 65,536")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error("--threshold must be a probability between 0 and 1")
    return args


READ_AHEAD = 32  # batches read ahead, and sorted by length, when lines come faster than they are classified


def run(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    literal = [str(a) for a in argv[argv.index("--") + 1:]] if "--" in argv else []
    args = parse_args(argv)
    given = args.messages[:len(args.messages) - len(literal)]
    for n, text in enumerate(given + literal, start=1):  # before the model loads
        if not text.strip():
            raise ValueError(f"message {n} is empty; give some text to classify")
    device = cli.pick_device(args.device)
    precision, _ = cli.choose_precision(args.precision, device)
    model, tokenizer, meta = load_classifier(args.adapter, args.model_dir, args.cache_dir, device, precision)
    max_length, labels = meta["max_length"], meta["labels"]
    threshold = meta["threshold"] if args.threshold is None else args.threshold
    counts = {"messages": 0, "blank": 0, "truncated": 0}
    # each group's results are printed, in input order, and flushed at once
    groups = message_groups(given, literal, sys.stdin, READ_AHEAD * args.batch_size, counts)
    for group in groups:
        encoded = [tokenizer.encode_ordinary(text) for _, text in group]
        counts["truncated"] += sum(len(ids) > max_length for ids in encoded)
        spam_probs = classify(model, tokenizer.eot_token, encoded, max_length, device, precision, args.batch_size)
        if not all(math.isfinite(p) for p in spam_probs):  # checked before any line of the group is printed
            raise ValueError("the model gave no finite probability; the adapter or base model is damaged")
        for (line, text), p_spam in zip(group, spam_probs):
            print(result_text(text, line, p_spam, threshold, labels, args.json))
        sys.stdout.flush()
    if counts["blank"]:
        print(f"note: skipped {counts['blank']:,} blank line(s) on stdin", file=sys.stderr)
    if counts["truncated"]:
        print(f"note: {counts['truncated']:,} message(s) longer than {max_length} tokens were truncated to the "
              f"first {max_length}, as in training", file=sys.stderr)


def result_text(text, line, p_spam, threshold, labels, as_json) -> str:
    """What predict.py prints for one message: a JSON object (with its stdin line number), or three lines."""
    label = labels[1] if p_spam >= threshold else labels[0]
    if as_json:
        where = {} if line is None else {"line": line}
        return json.dumps({**where, "text": text, "label": label, "spam_probability": round(p_spam, 6),
                           "threshold": threshold})
    spam = label == labels[1]  # the confidence is the probability of the label shown
    return (f"Text: {text!r}\nPrediction: {'SPAM' if spam else 'HAM (Normal)'} "
            f"(Confidence: {p_spam if spam else 1 - p_spam:.2f})\n" + "-" * 30)


def main(argv=None):
    cli.run_cli(lambda: run(argv), "predict.py")


if __name__ == "__main__":
    main()
