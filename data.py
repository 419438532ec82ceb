"""The SMS Spam Collection: download, parse, balance, split, and batch with dynamic padding.

Data: Almeida, Gómez Hidalgo and Yamakami, "Contributions to the Study of SMS Spam Filtering:
New Collection and Results", ACM DocEng 2011 (UCI Machine Learning Repository, dataset 228).
5,574 messages, one per line as `label<TAB>text`, 4,827 ham and 747 spam.

What the model sees: all 747 spam messages and as many ham messages drawn at random, shuffled
and split 70/10/20 into train/val/test (1,045/149/300); the 4,080 ham messages left out form an
"unused" split on which a spam filter's false-positive rate can be measured. Each message is
tokenized once. A batch is padded only to its own longest message, and the classifier reads the
logits at each message's last real token (`last_index`). Attention is causal, so those logits
never see the padding: a message gets the same prediction in any batch.

Usage:
    python data.py --data SMSSpamCollection --model-dir ../shared/data/gpt2-bpe
"""

from __future__ import annotations

import csv
import functools
import io
import random
import statistics
import sys
import zipfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import gpt2

SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_MEMBER = "SMSSpamCollection"
LABELS = ("ham", "spam")  # label ids 0 and 1
LABEL_IDS = {"ham": 0, "spam": 1, "0": 0, "1": 1}
PAD_ID = 50256  # GPT-2's <|endoftext|>, the usual pad token: it never needs to mean anything here
CONTEXT_LENGTH = 1024


class DataError(ValueError):
    """A data file that cannot be used, with what is wrong and where."""


# ----------------------------------------------------------------------------------------------
# Download


def download_sms(cache_dir=None) -> Path:
    """Fetch the official zip once into the cache and extract SMSSpamCollection; return its path."""
    folder = Path(cache_dir or gpt2.default_cache_dir()) / "sms"
    target = folder / SMS_MEMBER
    if target.exists():
        return target
    archive = folder / "sms+spam+collection.zip"
    if not archive.exists():
        try:
            gpt2.download_file(SMS_URL, archive)
        except gpt2.DownloadError as e:
            raise gpt2.DownloadError(f"{e}. Without internet, pass --data PATH to a local copy of "
                                     f"{SMS_MEMBER} (or its zip)") from None
    gpt2.atomic_write(target, _read_zip_member(archive))  # under our own name, never the archive's
    return target


def _read_zip_member(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as zf:
            if SMS_MEMBER not in zf.namelist():
                raise DataError(f"{path} has no member {SMS_MEMBER} (it holds {', '.join(zf.namelist()[:5]) or 'nothing'})")
            return zf.read(SMS_MEMBER)
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a valid zip file") from None


# ----------------------------------------------------------------------------------------------
# Parsing


def _label_of(value: str):
    return LABEL_IDS.get(value.strip().lower())


def read_messages(path) -> tuple[list[tuple[str, int]], int]:
    """(messages, how many invalid UTF-8 sequences were replaced by U+FFFD) of a data file.

    Accepts the SMSSpamCollection file itself (`label<TAB>text`), the official zip, or a user's
    .tsv/.csv with a label column (ham/spam or 0/1) and a text column in either order; a header
    line is skipped. Tab-separated lines are split on their first tab only, never with quote
    handling: in the real file, a quoting parser merges three lines into one.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; check --data")
    raw = _read_zip_member(path) if path.suffix.lower() == ".zip" else path.read_bytes()
    if not raw.strip():
        raise DataError(f"data file {path} is empty")
    lines = raw.split(b"\n")
    replaced, texts = 0, []
    for line in lines:
        text = line.decode("utf-8", errors="replace")
        replaced += text.count("\ufffd") - line.count("\ufffd".encode())
        texts.append(text.removesuffix("\r"))
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO("\n".join(texts))))  # a user's CSV: real quoting rules
        where = "comma"
    else:
        rows = [t.split("\t", 1) if _label_of(t.split("\t", 1)[0]) is not None else t.rsplit("\t", 1) for t in texts]
        where = "tab"
    messages, found = [], set()
    for number, fields in enumerate(rows, start=1):
        if not any(f.strip() for f in fields):
            continue  # blank lines, e.g. at the end of the file
        if len(fields) < 2:
            raise DataError(f"{path}, line {number}: no {where} between the label and the text")
        if _label_of(fields[0]) is not None:
            label, text = _label_of(fields[0]), (",".join(fields[1:]) if where == "comma" else fields[1])
        elif _label_of(fields[-1]) is not None:
            label, text = _label_of(fields[-1]), (",".join(fields[:-1]) if where == "comma" else fields[0])
        elif number == 1 and not messages:
            continue  # a header line such as "label<TAB>text"
        else:
            found.update(f.strip()[:20] for f in (fields[0], fields[-1]))
            raise DataError(f"{path}, line {number}: unknown label; found {', '.join(sorted(map(repr, found)))}, "
                            "expected ham/spam or 0/1")
        if not text.strip():
            raise DataError(f"{path}, line {number}: the message text is empty")
        messages.append((text, label))
    if not messages:
        raise DataError(f"data file {path} holds no messages")
    classes = {label for _, label in messages}
    if len(classes) < 2:
        raise DataError(f"{path} has only {LABELS[classes.pop()]} messages; a classifier needs both ham and spam")
    return messages, replaced


def load_messages(path) -> list[tuple[str, int]]:
    """(text, label) pairs of a data file, ham = 0, spam = 1 (see read_messages)."""
    return read_messages(path)[0]


# ----------------------------------------------------------------------------------------------
# Balance and split

SPLIT_FRACTIONS = (0.7, 0.1)  # train, val; test gets the rest


def split_dataset(messages, seed=42) -> dict[str, list[tuple[str, int]]]:
    """Balance the classes by undersampling, shuffle, split 70/10/20; the rest becomes "unused".

    Deterministic for a seed. With the real file: 747 spam + 747 ham -> 1,045 / 149 / 300, and
    4,080 unused ham.
    """
    by_class = {0: [m for m in messages if m[1] == 0], 1: [m for m in messages if m[1] == 1]}
    # undersample the larger class to the smaller one's size, so that always answering "ham" scores
    # 50 %, not 87 %, and accuracy means something
    n = min(len(v) for v in by_class.values())
    if n * 2 < 10:
        raise DataError(f"only {n} message(s) in the smaller class; need at least 5 of each to split 70/10/20")
    rng = random.Random(seed)
    chosen, unused = [], []
    for label in (0, 1):
        picked = set(rng.sample(range(len(by_class[label])), n))
        chosen += [m for i, m in enumerate(by_class[label]) if i in picked]
        unused += [m for i, m in enumerate(by_class[label]) if i not in picked]
    rng.shuffle(chosen)
    # int() rounds down: 1,494 messages -> 1,045 train, 149 val, and the remaining 300 for test
    n_train = int(len(chosen) * SPLIT_FRACTIONS[0])
    n_val = int(len(chosen) * SPLIT_FRACTIONS[1])
    return {"train": chosen[:n_train], "val": chosen[n_train:n_train + n_val],
            "test": chosen[n_train + n_val:], "unused": unused}


# ----------------------------------------------------------------------------------------------
# Tokenized datasets and batches


class SpamDataset(Dataset):
    """Messages tokenized once; items are (token ids, label).

    max_length: truncate longer messages to their first max_length tokens; default the longest
    message here, capped at GPT-2's context (1,024 tokens).
    """

    def __init__(self, messages, tokenizer, max_length=None):
        self.labels = [label for _, label in messages]
        # encode_ordinary: a message that contains "<|endoftext|>" is just text, not a special token
        encoded = [tokenizer.encode_ordinary(text) for text, _ in messages]  # once, not every epoch
        if any(not ids for ids in encoded):
            raise DataError("a message has no tokens; every message needs some text")
        longest = max((len(ids) for ids in encoded), default=1)
        self.max_length = min(longest, CONTEXT_LENGTH) if max_length is None else max_length
        if self.max_length < 1:
            raise DataError(f"max_length must be at least 1, got {self.max_length}")
        self.truncated = sum(len(ids) > self.max_length for ids in encoded)
        self.encoded = [ids[:self.max_length] for ids in encoded]

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        return self.encoded[i], self.labels[i]

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.encoded]


def collate(batch, pad_id=PAD_ID, pad_to=None):
    """Right-pad a list of (ids, label) to the longest in the batch (or to pad_to, if longer).

    Returns input_ids (B, T) int64, last_index (B,) — where each message's last real token is —
    and labels (B,).
    """
    T = max(max(len(ids) for ids, _ in batch), pad_to or 0)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T), all padding to start
    for row, (ids, _) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    last_index = torch.tensor([len(ids) - 1 for ids, _ in batch], dtype=torch.long)
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return input_ids, last_index, labels


class BucketBatchSampler(Sampler):
    """Batches of messages of similar length, in a new seeded random order every epoch.

    Each epoch: shuffle all indices, cut them into pools of `pool` batches, sort each pool by
    length, cut it into batches, and shuffle the batches. Padding shrinks to almost nothing while
    which messages meet in a batch still changes from epoch to epoch.
    """

    def __init__(self, lengths, batch_size, generator, pool=50, shuffle=True):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator
        self.pool, self.shuffle = pool, shuffle

    def __iter__(self):
        if not self.shuffle:  # evaluation: simply by length
            order = sorted(range(len(self.lengths)), key=self.lengths.__getitem__)
            yield from (order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size))
            return
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

    def __len__(self):
        return -(-len(self.lengths) // self.batch_size)


def make_loaders(splits, tokenizer, batch_size=8, seed=42, max_length=None, bucket=True,
                 pad_to=None, context_length=CONTEXT_LENGTH) -> dict[str, DataLoader]:
    """DataLoaders for every non-empty split; train is shuffled with a generator seeded by seed.

    max_length defaults to the longest training message (capped at context_length); the other
    splits are truncated to the same length. bucket batches similar lengths together; pad_to pads
    every batch to at least that many tokens (the reference course's fixed padding, for comparison).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if max_length is None:
        max_length = min(SpamDataset(splits["train"], tokenizer).max_length, context_length)
    if max_length > context_length:
        raise DataError(f"max_length {max_length} exceeds the model's context of {context_length} tokens")
    pad = functools.partial(collate, pad_id=tokenizer.eot_token, pad_to=pad_to)
    loaders = {}
    for name, messages in splits.items():
        if not messages:
            continue
        dataset = SpamDataset(messages, tokenizer, max_length=max_length)
        generator = torch.Generator().manual_seed(seed)
        train = name == "train"
        if bucket:
            sampler = BucketBatchSampler(dataset.lengths(), batch_size, generator, shuffle=train)
            loaders[name] = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad)
        else:
            loaders[name] = DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=generator,
                                       collate_fn=pad)
    return loaders


# ----------------------------------------------------------------------------------------------
# Command line: a learner's window into the data


def data_path(data=None, cache_dir=None) -> Path:
    """--data when given, else the cached (downloaded once) SMSSpamCollection."""
    return Path(data) if data else download_sms(cache_dir)


def tokenizer_folder(model_dir=None, cache_dir=None) -> Path:
    """--model-dir when given, else the cached 124M folder's two tokenizer files (downloaded once)."""
    if model_dir:
        return gpt2.model_folder(model_dir=model_dir)
    return gpt2.download_gpt2("124M", cache_dir=cache_dir, files=("encoder.json", "vocab.bpe"))


def main(argv=None):
    parser = gpt2.ArgumentParser(prog="data.py", description="Show what training will see of the SMS data.")
    parser.add_argument("--data", default=None, help="SMSSpamCollection, its zip, or your own .tsv/.csv "
                                                     "(default: download the official file once)")
    parser.add_argument("--model-dir", default=None, help="a folder with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--cache-dir", default=None, help="download cache (see gpt2.py --help)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the balance and split")
    parser.add_argument("--max-length", type=int, default=None, help="default: the longest training message")
    args = parser.parse_args(argv)
    if args.max_length is not None and not 1 <= args.max_length <= CONTEXT_LENGTH:
        parser.error(f"--max-length must be between 1 and {CONTEXT_LENGTH}")
    try:
        path = data_path(args.data, args.cache_dir)
        messages, replaced = read_messages(path)
        splits = split_dataset(messages, seed=args.seed)
        tokenizer = gpt2.load_tokenizer(tokenizer_folder(args.model_dir, args.cache_dir))
        train = SpamDataset(splits["train"], tokenizer, max_length=args.max_length)
    except (ValueError, OSError, gpt2.DownloadError) as e:
        parser.exit(2, f"data.py: error: {e}\n")

    n_spam = sum(label for _, label in messages)
    print(f"{path}: {len(messages):,} messages ({len(messages) - n_spam:,} ham, {n_spam:,} spam)")
    if replaced:
        print(f"note: {replaced:,} invalid UTF-8 sequence(s) were replaced by U+FFFD")
    print(f"Max length: {train.max_length} tokens"
          + (" (the longest training message)" if args.max_length is None else " (--max-length)"))
    print(f"\nBalanced split, seed {args.seed}:")
    print(f"  {'split':<7} {'total':>6} {'ham':>6} {'spam':>6}   tokens min / median / max   truncated")
    for name, split in splits.items():
        ds = SpamDataset(split, tokenizer, max_length=train.max_length)
        full = [len(tokenizer.encode_ordinary(t)) for t, _ in split]
        spam = sum(label for _, label in split)
        print(f"  {name:<7} {len(split):>6,} {len(split) - spam:>6,} {spam:>6,}   "
              f"{min(full):>6} / {statistics.median(full):>6g} / {max(full):<6}     {ds.truncated:>6,}")
    train_texts = {text for text, _ in splits["train"]}
    leaks = {name: sum(text in train_texts for text, _ in splits[name]) for name in ("val", "test", "unused")}
    print("\nAlso in train, word for word (duplicate lines leak across a random split): "
          + ", ".join(f"{name} {n:,} of {len(splits[name]):,}" for name, n in leaks.items()))
    print("\nExamples (first three training messages):")
    for (text, label), ids in zip(splits["train"][:3], train.encoded[:3]):
        print(f"  [{LABELS[label]}] {text!r}\n         {len(ids)} tokens: {ids}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("data.py: interrupted")
