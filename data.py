"""The SMS Spam Collection: balance, split, batch with dynamic padding; read and download the file.

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

import cli

if __name__ == "__main__":
    cli.exit_on_signals_while_importing("data.py")  # torch takes about 2 s to import

import codecs
import csv
import functools
import hashlib
import io
import random
import re
import statistics
import sys
import zipfile
import zlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import gpt2

SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_MEMBER = "SMSSpamCollection"
LABELS = ("ham", "spam")  # label ids 0 and 1
LABEL_IDS = {"ham": 0, "spam": 1, "0": 0, "1": 1}
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # of SMSSpamCollection


class DataError(ValueError):
    """A data file that cannot be used, with what is wrong and where."""


# ----------------------------------------------------------------------------------------------
# 1. Balance and split

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
# 2. Tokenized datasets, padded batches, length buckets and loaders

class SpamDataset(Dataset):
    """Messages tokenized once; items are (token ids, label).

    max_length: truncate longer messages to their first max_length tokens; default the longest
    message here, capped at the model's context_length.
    """

    def __init__(self, messages, tokenizer, max_length=None, context_length=None):
        self.labels = [label for _, label in messages]
        # encode_ordinary: a message that contains "<|endoftext|>" is just text, not a special token
        encoded = [tokenizer.encode_ordinary(text) for text, _ in messages]  # once, not every epoch
        if any(not ids for ids in encoded):
            raise DataError("a message has no tokens; every message needs some text")
        longest = max((len(ids) for ids in encoded), default=1)
        self.max_length = min(longest, context_length or longest) if max_length is None else max_length
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


def collate(batch, pad_id, pad_to=None):
    """Right-pad a list of (ids, label) to the longest in the batch (or to pad_to, if longer).

    pad_id: the tokenizer's <|endoftext|> (tokenizer.eot_token), GPT-2's usual pad token; what it
    holds never matters, since the logits are read before it. Returns input_ids (B, T) int64,
    last_index (B,) (where each message's last real token is) and labels (B,).
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

    labels: when given, batches of one class are mixed (see mix_classes). Spam is longer than ham,
    so sorting by length alone puts about 50 of the 131 training batches in one class, and the
    gradient of such a batch only says "more spam" or "more ham".
    """

    def __init__(self, lengths, batch_size, generator, pool=50, shuffle=True, labels=None):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator
        self.pool, self.shuffle, self.labels = pool, shuffle, labels

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
            pool = [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            if self.labels is not None:
                mix_classes(pool, self.lengths, self.labels)
            batches += pool
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

    def __len__(self):
        return -(-len(self.lengths) // self.batch_size)


def mix_classes(batches, lengths, labels, reach=20):
    """Give each batch of one class a message of the other, in place, where a batch at most `reach`
    batches away (in length order) holds two or more of the other class: swap one message with it,
    choosing the swap that adds the fewest padded tokens. Deterministic."""
    def padded(batch):
        return len(batch) * max(lengths[i] for i in batch)

    def swap_cost(batch, other, e, m):  # padded tokens added by swapping e of batch with m of other
        swapped = padded([x for x in batch if x != e] + [m]) + padded([x for x in other if x != m] + [e])
        return swapped - padded(batch) - padded(other)

    for k, batch in enumerate(batches):
        if len(batch) < 2 or len({labels[i] for i in batch}) > 1:
            continue
        best = None  # (added padded tokens, other batch, its message, this batch's message)
        for j in range(max(0, k - reach), min(len(batches), k + reach + 1)):
            other = [m for m in batches[j] if labels[m] != labels[batch[0]]]
            if j == k or len(other) < 2:  # the other batch must keep a message of each class
                continue
            for m in other:
                for e in (batch[0], batch[-1]):  # this batch's shortest or longest message
                    cost = swap_cost(batch, batches[j], e, m)
                    if best is None or cost < best[0]:
                        best = (cost, j, m, e)
        if best is not None:
            _, j, m, e = best
            batch[batch.index(e)], batches[j][batches[j].index(m)] = m, e
            batch.sort(key=lengths.__getitem__)
            batches[j].sort(key=lengths.__getitem__)


def make_loaders(splits, tokenizer, batch_size=8, seed=42, max_length=None, bucket=True,
                 pad_to=None, context_length=1024) -> dict[str, DataLoader]:
    """DataLoaders for every non-empty split; train is shuffled with a generator seeded by seed.

    max_length defaults to the longest training message (capped at context_length); the other
    splits are truncated to the same length. bucket batches similar lengths together; pad_to pads
    every batch to at least that many tokens (the reference course's fixed padding, for comparison).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if max_length is None:
        max_length = SpamDataset(splits["train"], tokenizer, context_length=context_length).max_length
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
            sampler = BucketBatchSampler(dataset.lengths(), batch_size, generator, shuffle=train,
                                         labels=dataset.labels if train else None)
            loaders[name] = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad)
        else:
            loaders[name] = DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=generator,
                                       collate_fn=pad)
    return loaders


# ----------------------------------------------------------------------------------------------
# 3. Reading a data file: bytes -> text -> rows -> (text, label) messages
#
# read_messages accepts what a learner is likely to pass as --data: the file itself, the official
# zip (under any name), a folder that holds the file, or their own .tsv/.csv. It works in steps,
# bytes -> text -> rows -> messages. Each step either undoes one known way a copy differs from the
# original (a BOM, UTF-16, Windows-1252, CR line ends, commas, extra columns) or refuses the file
# with one line that says what is wrong and how to fix it. What it had to guess becomes a note.


def read_messages(path) -> tuple[list[tuple[str, int]], list[str]]:
    """(messages, notes) of a data file: (text, label) pairs, ham = 0, spam = 1, and one line per
    thing the caller should tell the user (each starts with "note: "; print them on stderr).

    Accepts the SMSSpamCollection file itself (`label<TAB>text`), the official zip (by content,
    whatever its name), a folder that holds SMSSpamCollection, or a user's .tsv/.csv: label
    column ham/spam or 0/1, first or last, an optional header line, an optional leading index
    column, in UTF-8 (with or without BOM), UTF-16/32 with BOM, or Latin-1/Windows-1252, with
    LF, CRLF or CR line ends. Tab-separated lines are only split at tabs, never with quote
    handling: in the real file, a quoting parser merges three lines into one. Anything else
    raises DataError with one line: the file, what is wrong, and the fix.
    """
    notes = []
    path = _data_file(Path(path), notes)
    raw, suffix = _read_bytes(path, notes)
    text = _LINE_BREAK.sub("\n", _decode(raw, path, notes))
    if not text.strip():
        raise DataError(f"data file {path} is empty (or only whitespace); pass the {SMS_MEMBER} file, "
                        "one `label<TAB>text` message per line")
    sep = _separator(text.split("\n"), path, suffix, notes)
    rows = _rows(text, sep, path, notes)
    layout = _layout(rows)
    if len(rows[0][1]) >= 2 and not _fits(rows[0][1], layout):
        rows = rows[1:]  # a header line such as "label<TAB>text" or Kaggle's "v1,v2,,,"
    messages = [_message(fields, layout, sep, f"{path}, line {number}") for number, fields in rows]
    _check_classes(messages, path)
    return messages, notes


def load_messages(path) -> list[tuple[str, int]]:
    """(text, label) pairs of a data file, ham = 0, spam = 1 (see read_messages)."""
    return read_messages(path)[0]


def _check_classes(messages: list[tuple[str, int]], path: Path) -> None:
    if not messages:
        raise DataError(f"data file {path} holds no messages, only a header line; add `label<TAB>text` lines")
    classes = {label for _, label in messages}
    if len(classes) < 2:
        raise DataError(f"{path} has only {LABELS[classes.pop()]} messages; a classifier needs both ham and "
                        "spam: pass the whole data file")


# Layouts of a row, tried in this order: (has an index column, the label's place among the rest:
# 0 first, -1 last). The first is the original file's; an index column comes from pandas' to_csv.
_LAYOUTS = ((False, 0), (True, 0), (True, -1), (False, -1))


def _label_of(value: str):
    return LABEL_IDS.get(value.strip().lower())


def _rows(text: str, sep: str, path: Path, notes: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row; empty trailing fields beyond two are dropped."""
    if sep == "\t":  # split only: in a tab file a quote mark is part of the text
        rows = [(number, line.split("\t")) for number, line in enumerate(text.split("\n"), start=1)]
    else:
        rows = _csv_rows(text, path, notes)
    for _, fields in rows:
        while len(fields) > 2 and not fields[-1]:  # Kaggle's ",,,"; a spreadsheet's empty columns
            fields.pop()
    return [(number, fields) for number, fields in rows if any(f.strip() for f in fields)]


def _layout(rows: list[tuple[int, list[str]]]):
    """The layout that most rows fit; ties go to the order of _LAYOUTS, except that a header with
    an empty or "Unnamed: 0" first column (pandas' index) puts the layouts with an index first."""
    first = rows[0][1][0].strip()
    order = _LAYOUTS
    if first == "" or first.startswith("Unnamed: "):
        order = sorted(_LAYOUTS, key=lambda layout: not layout[0])  # stable: keeps the order within
    return max(order, key=lambda layout: sum(_fits(fields, layout) for _, fields in rows))


def _fits(fields: list[str], layout) -> bool:
    has_index, at = layout
    if has_index:
        if not fields[0].strip().isdigit():
            return False
        fields = fields[1:]
    return len(fields) >= 2 and _label_of(fields[at]) is not None


def _message(fields: list[str], layout, sep: str, where: str) -> tuple[str, int]:
    """(text, label) of one row; where is "file, line n" for the error messages."""
    has_index, at = layout
    body = fields[1:] if has_index else fields
    name, shown = ("tab", "<TAB>") if sep == "\t" else ("comma", ",")
    if len(body) < 2:
        raise DataError(f"{where}: no {name} between the label and the text; write each message as "
                        f"label{shown}text")
    label = _label_of(body[at])
    if label is None:
        found = sorted({repr(f.strip()[:20]) for f in (body[0], body[-1])})
        raise DataError(f"{where}: unknown label; found {', '.join(found)}, expected ham/spam or 0/1 "
                        "in the first or last column")
    # a comma file's text may have been cut at its commas into more columns: join them back
    text = sep.join(body[1:] if at == 0 else body[:-1])
    if not text.strip():
        raise DataError(f"{where}: the message text is empty; remove the line or give it a text")
    return text, label


# ----------------------------------------------------------------------------------------------
# 4. From a path to rows: folders, zips, binary files, encodings, separators and CSV

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty zip
# Byte-order marks, longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# Files people pass by mistake, known by their first bytes: (magic, what it is, the fix).
_BINARY_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data", "decompress it first (gunzip)"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it first (unxz)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract the data file from it first"),
    (b"\xd0\xcf\x11\xe0", "an old Excel or Word document", "save it from Excel as CSV UTF-8 and pass the .csv"),
    (b"%PDF", "a PDF document", "pass the data file itself"),
    (b"\x89PNG", "a PNG image", "pass the data file itself"),
    (b"\xff\xd8\xff", "a JPEG image", "pass the data file itself"),
)
# Only these end a line. str.splitlines() would also split at U+2028, U+0085 (NEL), VT, FF and
# more, which can sit inside an SMS text, and would cut such a message in two.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")


def _data_file(path: Path, notes: list[str]) -> Path:
    """The file to read: path itself, or the SMSSpamCollection inside a folder passed instead."""
    if path.is_dir():
        inside = path / SMS_MEMBER
        if inside.is_file():  # the unzipped official folder: no doubt which file was meant
            notes.append(f"note: {path} is a folder; read the {SMS_MEMBER} file inside it")
            return inside
        names = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
        raise DataError(f"{path} is a folder, not a data file (it holds {names}); pass the {SMS_MEMBER} "
                        "file inside it, or your own .tsv/.csv, with --data")
    if not path.exists():
        raise DataError(f"data file {path} not found; check --data")
    if not path.is_file():
        raise DataError(f"{path} is not a regular file; pass the {SMS_MEMBER} file with --data")
    return path


def _read_bytes(path: Path, notes: list[str]) -> tuple[bytes, str]:
    """(bytes, suffix) of the data: a zip's SMSSpamCollection, whatever the zip is named, or the
    file itself. The suffix (".csv", ".tsv", "" ...) is the data's own, not the zip's."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path} ({e.strerror or e}); check its permissions") from None
    if path.suffix.lower() == ".zip":
        return _read_zip_member(path), ""
    if raw.startswith(_ZIP_MAGIC):  # e.g. the official zip saved under the name SMSSpamCollection
        notes.append(f"note: {path} is a zip archive; read the {SMS_MEMBER} inside it")
        return _read_zip_member(path), ""
    return raw, path.suffix.lower()


def _refuse_binary(raw: bytes, path: Path) -> None:
    for magic, what, fix in _BINARY_MAGIC:
        if raw.startswith(magic):
            raise DataError(f"{path} is not a text file of messages: it is {what}; {fix}")
    # Text has no NUL bytes; binary files almost always do (and so does UTF-16 without a BOM).
    nuls = raw.count(b"\0")
    if nuls:
        line = len(_LINE_BREAK_BYTES.split(raw[:raw.index(b"\0")]))
        if nuls <= 3:  # a text file with a stray byte: say where, so that it can be fixed
            raise DataError(f"{path}, line {line}: a NUL byte (\\0), which text never holds; delete it there "
                            "(or save the file again as UTF-8 text)")
        raise DataError(f"{path} is not a text file of messages: it holds {nuls:,} NUL bytes, the first on line "
                        f"{line} (binary data, or UTF-16 without a byte-order mark); pass the {SMS_MEMBER} text "
                        "file, or save your data as UTF-8 text")


def _decode(raw: bytes, path: Path, notes: list[str]) -> str:
    """The file's text: by its byte-order mark if it has one, else UTF-8, else Windows-1252."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):  # Notepad and Excel write these; the mark itself is not text
            if codec == "utf-8":
                return _decode_utf8(raw[len(bom):], path, notes)
            return _decode_utf16_or_32(raw[len(bom):], codec, path)
    _refuse_binary(raw, path)
    try:
        return raw.decode("utf-8")  # the original file, and nearly every file today
    except UnicodeDecodeError:
        pass
    if _mostly_not_utf8(raw):
        notes.append(f"note: {path} is not UTF-8; read it as Latin-1 (Windows-1252, which puts quotes and "
                     "dashes at 0x80-0x9F); save it as UTF-8 if its accents or symbols look wrong")
        return raw.decode("latin-1").translate(_WINDOWS_1252)
    return _decode_utf8(raw, path, notes)


def _decode_utf8(raw: bytes, path: Path, notes: list[str]) -> str:
    """UTF-8 text; a few invalid bytes become U+FFFD, with a note that says how many and where."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(_LINE_BREAK_BYTES.split(raw[:e.start]))
    text = raw.decode("utf-8", errors="replace")
    # a U+FFFD already in the file is valid text, not a replacement: leave it out of the count
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    notes.append(f"note: {replaced:,} invalid UTF-8 sequence(s) in {path} were replaced by U+FFFD "
                 f"(the first on line {line})")
    return text


def _decode_utf16_or_32(raw: bytes, codec: str, path: Path) -> str:
    name = codec[:6].upper()  # "UTF-16" or "UTF-32"
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as e:  # a BOM leaves no doubt about the encoding: refuse, don't guess
        raise DataError(f"{path} starts with a {name} byte-order mark but is not valid {name} "
                        f"({e.reason} near byte {e.start}; cut short?); save it again as UTF-8") from None


def _mostly_not_utf8(raw: bytes) -> bool:
    """Whether most lines with non-ASCII bytes are invalid UTF-8: then the file is Latin-1 or
    Windows-1252, as Kaggle's spam.csv is. A UTF-8 file with a few stray bad bytes still has
    mostly valid non-ASCII lines, and stays UTF-8 (ties too)."""
    valid = invalid = 0
    for line in _LINE_BREAK_BYTES.split(raw):
        if not line.isascii():
            try:
                line.decode("utf-8")
                valid += 1
            except UnicodeDecodeError:
                invalid += 1
    return invalid > valid


def _windows_1252_table() -> dict[int, str]:
    """Latin-1 -> Windows-1252: 0x80-0x9F become Windows' quotes, dashes, € and so on.

    The five bytes Windows-1252 leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) stay as Latin-1
    reads them, as web browsers do: so every byte decodes, and one odd byte cannot send a whole
    file back to plain Latin-1, where the quotes would be invisible control characters.
    """
    table = {}
    for byte in range(0x80, 0xA0):
        try:
            table[byte] = bytes([byte]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    return table


_WINDOWS_1252 = _windows_1252_table()


def _separator(lines: list[str], path: Path, suffix: str, notes: list[str]) -> str:
    """Tab or comma: whichever is on more of the first 100 lines; a tie goes by the file's suffix.

    The original file has a tab on every line and a comma on few; a CSV the other way round. So a
    renamed file still parses, and a tab file is never read with CSV quoting (which would merge
    lines of the original file at their quote marks).
    """
    sample = [line for line in lines[:100] if line.strip()]
    tabs, commas = sum("\t" in line for line in sample), sum("," in line for line in sample)
    by_name = "," if suffix == ".csv" else "\t"
    if tabs == commas:
        return by_name
    found, name = ("\t", "tab") if tabs > commas else (",", "comma")
    if found != by_name:
        notes.append(f"note: {path} is {name}-separated despite its name; read it as such")
    return found


def _csv_rows(text: str, path: Path, notes: list[str]) -> list[tuple[int, list[str]]]:
    """A user's CSV, with real quoting rules (a quoted text may hold commas, "" and newlines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, start = [], 1
    try:
        for fields in reader:
            rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e}); check the quotes there") from None
    spanning = [number for number, fields in rows if any("\n" in f for f in fields)]
    if spanning:  # legal, but an unclosed quote swallows the lines after it in just this way
        notes.append(f"note: {path}: {len(spanning):,} quoted text(s) span several lines, the first on line "
                     f"{spanning[0]}; if that is not meant, a quote mark there is not closed")
    return rows


def _read_zip_member(path: Path) -> bytes:
    """The SMSSpamCollection member of a zip (also one inside a folder of the zip)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(_sms_member_name(path, zf.namelist()))
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise DataError(f"{path} is not a valid zip file (a damaged or partial download?); download it "
                        f"again, or pass the unzipped {SMS_MEMBER}") from None
    except (RuntimeError, NotImplementedError) as e:  # encrypted, or a compression zipfile lacks
        raise DataError(f"{path}: cannot unzip {SMS_MEMBER} ({e}); unzip it with another tool and pass "
                        "the file itself") from None


def _sms_member_name(path: Path, names: list[str]) -> str:
    if SMS_MEMBER in names:
        return SMS_MEMBER
    nested = [name for name in names if name.rsplit("/", 1)[-1] == SMS_MEMBER]
    if len(nested) == 1:  # someone zipped the unzipped folder again
        return nested[0]
    if any(name.startswith("xl/") for name in names):  # an .xlsx file is a zip of XML parts
        raise DataError(f"{path} is an Excel workbook, not a text file; save it from Excel as "
                        "CSV UTF-8 and pass the .csv")
    raise DataError(f"{path} is a zip archive that has no member {SMS_MEMBER} (it holds "
                    f"{', '.join(names[:5]) or 'nothing'}); extract your data file and pass it with --data")


# ----------------------------------------------------------------------------------------------
# 5. Download

def download_sms(cache_dir=None) -> Path:
    """Fetch the official zip once into the cache and extract SMSSpamCollection; return its path."""
    folder = Path(cache_dir or cli.default_cache_dir()) / "sms"
    target = folder / SMS_MEMBER
    if target.exists():
        return target
    archive = folder / "sms+spam+collection.zip"

    def check(part):  # the zip itself has no published hash; the file inside it has
        member = _read_zip_member(part)
        if hashlib.sha256(member).hexdigest() != SMS_SHA256:
            raise ValueError(f"its {SMS_MEMBER} is not the published file (sha256 differs)")
    if not archive.exists():
        try:
            cli.download_file(SMS_URL, archive, check=check)
        except cli.DownloadError as e:
            raise cli.DownloadError(f"{e}. Without internet, pass --data PATH to a local copy of "
                                     f"{SMS_MEMBER} (or its zip)") from None
    cli.atomic_write(target, _read_zip_member(archive))  # under our own name, never the archive's
    return target


def data_path(data=None, cache_dir=None) -> Path:
    """--data when given, else the cached (downloaded once) SMSSpamCollection."""
    return Path(data) if data else download_sms(cache_dir)


def tokenizer_folder(model_dir=None, cache_dir=None) -> Path:
    """--model-dir when given, else the cached 124M folder's two tokenizer files (downloaded once)."""
    if model_dir:
        return gpt2.model_folder(model_dir=model_dir)
    return gpt2.download_gpt2("124M", cache_dir=cache_dir, files=("encoder.json", "vocab.bpe"),
                              offline_hint="pass --model-dir DIR, a folder holding GPT-2's encoder.json and vocab.bpe")


# ----------------------------------------------------------------------------------------------
# 6. Command line: a learner's window into the data

def main(argv=None):
    cli.run_cli(lambda: report(parse_args(argv)), "data.py", expected=(DataError,))


def parse_args(argv):
    parser = cli.ArgumentParser(prog="data.py", description="Show what training will see of the SMS data.")
    parser.add_argument("--data", default=None, help="SMSSpamCollection, its zip, or your own .tsv/.csv "
                                                     "(default: download the official file once)")
    parser.add_argument("--model-dir", default=None, help="a folder with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--cache-dir", default=None, help="download cache (see gpt2.py --help)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the balance and split")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate messages to this many tokens (default: the longest training message)")
    args = parser.parse_args(argv)
    if args.max_length is not None and not 1 <= args.max_length <= gpt2.CONFIG_BOUNDS["context_length"]:
        parser.error("--max-length must be at least 1 (and at most the model's context)")
    if not 0 <= args.seed < 2**63:
        parser.error("--seed must be between 0 and 2**63 - 1")
    return args


def report(args):
    path, folder = cli.fetch_all(lambda: data_path(args.data, args.cache_dir),
                                 lambda: tokenizer_folder(args.model_dir, args.cache_dir))
    messages, notes = read_messages(path)
    splits = split_dataset(messages, seed=args.seed)
    tokenizer = gpt2.load_tokenizer(folder)
    train = SpamDataset(splits["train"], tokenizer, max_length=args.max_length)
    n_spam = sum(label for _, label in messages)
    print(f"{path}: {len(messages):,} messages ({len(messages) - n_spam:,} ham, {n_spam:,} spam)")
    for note in notes:
        print(note, file=sys.stderr)
    print(f"Max length: {train.max_length} tokens"
          + (" (the longest training message)" if args.max_length is None else " (--max-length)"))
    print(f"\nBalanced split, seed {args.seed}:")
    print(f"  {'split':<7} {'total':>6} {'ham':>6} {'spam':>6}   tokens min / median / max   truncated")
    for name, split in splits.items():
        if not split:  # balanced data leave no unused messages
            print(f"  {name:<7} {0:>6}")
            continue
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
    main()
