"""Classify SMS messages as spam or ham with an adapter that train.py made.

The adapter file names its base model; predict.py loads that GPT-2 (memory-mapped, no random
init), adds the LoRA layers and the classification head, loads the adapter, and merges the
LoRA update into the weights (W <- W + (alpha/r) (A B)^T) so that inference costs no more than
the base model. Messages are batched by length.

Usage:
    python predict.py "There is a big cash prize for you, call immediately."
    python predict.py --json "msg one" "msg two"
    cat messages.txt | python predict.py -          # one message per line
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import data
import gpt2
import lora
from train import DEFAULT_OUT, add_classification_head, autocast_for, logits_at_last_token


def load_classifier(adapter_path, model_dir=None, cache_dir=None, device="cpu"):
    """(merged model, tokenizer, adapter metadata) ready for inference."""
    adapter_path = Path(adapter_path)
    if not adapter_path.exists():
        raise FileNotFoundError(f"no trained adapter at {adapter_path} — run python train.py first")
    meta, tensors = lora.read_adapter(adapter_path)
    if model_dir is None and meta.get("model_dir") and Path(meta["model_dir"]).is_dir():
        model_dir = meta["model_dir"]  # the folder it was trained on, if it is still there
    folder = gpt2.model_folder(meta.get("model", "124M"), model_dir, cache_dir, meta.get("weights_source", "openai"))
    model, tokenizer = gpt2.load_model_and_tokenizer(folder, device=device)
    trained_on = meta.get("config")
    if trained_on and trained_on != {k: getattr(model.cfg, k) for k in trained_on}:
        raise ValueError(f"{adapter_path} was trained on another base model ({trained_on}); {folder} holds "
                         f"{model.cfg}. Point --model-dir at the model it was trained on")
    lora.replace_linear_with_lora(model, meta["rank"], meta["alpha"], meta.get("dropout", 0.0),
                                  targets=None if meta.get("targets") == "all" else meta.get("targets"))
    add_classification_head(model, num_classes=len(meta.get("labels", data.LABELS)))
    lora.load_adapter(model, adapter_path, adapter=(meta, tensors))
    lora.merge_lora(model)  # W <- W + (alpha/r) (A B)^T: from here on it is a plain GPT-2
    return model.requires_grad_(False).eval(), tokenizer, meta


@torch.inference_mode()
def classify(model, pad_id, encoded, max_length, device, batch_size=32) -> list[float]:
    """Spam probability of each tokenized message, in order; batched by length and right-padded."""
    encoded = [ids[:max_length] for ids in encoded]  # the first max_length tokens, as in training
    # batching by length keeps padding small; the results are the same in any order (causal attention)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    spam = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, last_index, _ = data.collate([(encoded[i], 0) for i in rows], pad_id=pad_id)
        with autocast_for(device):
            logits = logits_at_last_token(model, input_ids.to(device), last_index.to(device))  # (B, 2)
        for i, p in zip(rows, torch.softmax(logits.float(), dim=-1)[:, 1].tolist()):  # P(spam)
            spam[i] = p
    return spam


def read_texts(args_texts, stdin) -> list[str]:
    """Messages from the arguments; "-" stands for stdin, one message per line (bad UTF-8 replaced)."""
    texts = []
    for arg in args_texts:
        if arg == "-":
            texts += stdin.buffer.read().decode("utf-8", errors="replace").splitlines()
        else:
            # arguments the OS could not decode arrive as surrogates; make them U+FFFD instead
            texts.append(arg.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace"))
    return texts


def main(argv=None):
    p = gpt2.ArgumentParser(prog="predict.py", description="Tell spam from ham with a trained LoRA adapter.")
    p.add_argument("messages", nargs="+", help='messages to classify; "-" reads one message per line from stdin')
    p.add_argument("--adapter", default=DEFAULT_OUT, help="adapter file written by train.py")
    p.add_argument("--json", action="store_true", help="print one JSON object per message")
    p.add_argument("--model-dir", default=None, help="base model folder (default: the one named in the adapter)")
    p.add_argument("--cache-dir", default=None, help="download cache (see gpt2.py --help)")
    p.add_argument("--batch-size", type=int, default=32, help="messages per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    texts = read_texts(args.messages, sys.stdin)
    for n, text in enumerate(texts, start=1):
        if not text.strip():
            p.error(f"message {n} is empty; give some text to classify")
    try:
        device = gpt2.pick_device(args.device)
        model, tokenizer, meta = load_classifier(args.adapter, args.model_dir, args.cache_dir, device)
    except (ValueError, OSError, gpt2.DownloadError) as e:
        p.exit(2, f"predict.py: error: {e}\n")
    max_length = meta["max_length"]
    encoded = [tokenizer.encode_ordinary(t) for t in texts]
    long = sum(len(ids) > max_length for ids in encoded)
    if long:
        print(f"note: {long} message(s) longer than {max_length} tokens were truncated to the first "
              f"{max_length}, as in training", file=sys.stderr)
    labels = meta.get("labels", list(data.LABELS))
    for text, p_spam in zip(texts, classify(model, tokenizer.eot_token, encoded, max_length, device, args.batch_size)):
        label = labels[1] if p_spam >= 0.5 else labels[0]
        if args.json:
            print(json.dumps({"text": text, "label": label, "spam_probability": round(p_spam, 6)}))
        else:
            shown = "SPAM" if label == labels[1] else "HAM (Normal)"
            print(f"Text: {text!r}\nPrediction: {shown} (Confidence: {max(p_spam, 1 - p_spam):.2f})\n" + "-" * 30)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("predict.py: interrupted")
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)
