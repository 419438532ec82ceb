"""Classify SMS messages as spam or ham with an adapter that train.py made.

The adapter file names its base model; predict.py loads that GPT-2 (memory-mapped, no random
init), builds the same LoRA classifier, loads the adapter, and merges the LoRA update into the
weights (W <- W + (alpha/r) (A B)^T) so that inference costs no more than the base model.
Messages are batched by length; a message is spam when P(spam) >= the adapter's threshold.

Usage:
    python predict.py "There is a big cash prize for you, call immediately."
    python predict.py --json "msg one" "msg two"
    cat messages.txt | python predict.py -          # one message per line
    python predict.py -- -                          # the message "-" itself
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.exit_on_signals_while_importing("predict.py")  # torch takes about 2 s to import

import json
import math
import sys
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


def read_texts(args_texts, literal, stdin) -> list[str]:
    """Messages from the arguments; "-" stands for stdin, one message per line. Only "\\n" ends a
    line (a U+2028 inside a message stays in it); bad UTF-8 is replaced. literal: the arguments
    given after "--", taken as they are, "-" included."""
    texts = []
    for arg in args_texts:
        if arg == "-":
            if stdin is None or stdin.closed:
                raise ValueError('stdin is closed, so "-" has nothing to read; pipe messages in or give them '
                                 "as arguments")
            lines = stdin.buffer.read().decode("utf-8", errors="replace").split("\n")
            lines = [line.removesuffix("\r") for line in (lines[:-1] if lines[-1] == "" else lines)]
            if not lines:
                raise ValueError('no messages were given on stdin ("-"); pipe in one message per line')
            texts += lines
        else:
            texts.append(arg)
    # arguments the OS could not decode arrive as surrogates; make them U+FFFD instead
    return [t.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace") for t in texts + literal]


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


def run(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    literal = [str(a) for a in argv[argv.index("--") + 1:]] if "--" in argv else []
    args = parse_args(argv)
    texts = read_texts(args.messages[:len(args.messages) - len(literal)], literal, sys.stdin)
    for n, text in enumerate(texts, start=1):
        if not text.strip():
            raise ValueError(f"message {n} is empty; give some text to classify")
    device = cli.pick_device(args.device)
    precision, _ = cli.choose_precision(args.precision, device)
    model, tokenizer, meta = load_classifier(args.adapter, args.model_dir, args.cache_dir, device, precision)
    max_length, labels = meta["max_length"], meta["labels"]
    threshold = meta["threshold"] if args.threshold is None else args.threshold
    encoded = [tokenizer.encode_ordinary(t) for t in texts]
    long = sum(len(ids) > max_length for ids in encoded)
    if long:
        print(f"note: {long} message(s) longer than {max_length} tokens were truncated to the first "
              f"{max_length}, as in training", file=sys.stderr)
    spam_probs = classify(model, tokenizer.eot_token, encoded, max_length, device, precision, args.batch_size)
    if not all(math.isfinite(p) for p in spam_probs):  # checked before any line is printed
        raise ValueError("the model gave no finite probability; the adapter or base model is damaged")
    for text, p_spam in zip(texts, spam_probs):
        label = labels[1] if p_spam >= threshold else labels[0]
        if args.json:
            print(json.dumps({"text": text, "label": label, "spam_probability": round(p_spam, 6),
                              "threshold": threshold}))
        else:
            spam = label == labels[1]  # the confidence is the probability of the label shown
            print(f"Text: {text!r}\nPrediction: {'SPAM' if spam else 'HAM (Normal)'} "
                  f"(Confidence: {p_spam if spam else 1 - p_spam:.2f})\n" + "-" * 30)


def main(argv=None):
    cli.run_cli(lambda: run(argv), "predict.py")


if __name__ == "__main__":
    main()
