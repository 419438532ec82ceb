"""Shared test material for test_lora.py: the fixtures more than one of its sections uses, and the
references the tests compare the code against.

- Path constants: HERE, TESTDATA (checkpoints real TensorFlow wrote), SHARED (the real data in
  ../shared/data, when present), TINY_TF.
- Independent references: a numpy GPT-2 (numpy_gpt2) with the TensorFlow fixture's values
  (tf_fixture_values), CRC-32C from its definition (crc32c_reference), GPT-2's byte alphabet and
  tiny BPE files made the way OpenAI's are (write_tiny_bpe), Hugging Face's tensor names written
  out by hand (to_hf_layout), and parameter counts by hand (hand_count, lora_count).
- Builders: random_tensors, tiny_cfg, tiny_classifier, train_steps, adapter_file, synthetic_messages,
  write_sms_file.
- Running the scripts: run_main (main(argv) in this process), one_line, run_script (a subprocess).
- A local HTTP server on the loopback address (RangeHandler, the http_server fixture, url_of).
- Fixtures: tiny_model_dir, tiny_tokenizer, http_server; and, made once per test module,
  workdir (a tiny model folder and a messages file), trained and hostile (adapters trained on them).

test_lora.py imports the helpers with "from conftest import ..."; pytest finds the fixtures itself.
"""

import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import formats
import gpt2
import lora
import train

HERE = Path(__file__).resolve().parent
TESTDATA = HERE / "testdata"
SHARED = HERE.parent / "shared" / "data"
TINY_TF = TESTDATA / "tf-tiny-gpt2"


def run_main(main, argv, capsys):
    """Call a script's main(argv) in this process; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def one_line(stderr):
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def run_script(*args, stdin=None, cwd=None):
    """Run one of the repository's scripts as a user would, in a subprocess."""
    return subprocess.run([sys.executable, *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=cwd or HERE, timeout=300)


# ----------------------------------------------------------------------------------------------
# An independent GPT-2: numpy, float64, straight from OpenAI's checkpoint layout


def numpy_gpt2(w, n_head, ids):
    """Logits (T, V) of GPT-2 for one sequence; w holds OpenAI's tensor names without "model/"."""

    def layer_norm(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    w = {k: v.astype(np.float64) for k, v in w.items()}
    T = len(ids)
    x = w["wte"][ids] + w["wpe"][:T]
    n_layer = sum(1 for k in w if k.endswith("/ln_1/g"))
    for i in range(n_layer):
        p = f"h{i}/"
        h = layer_norm(x, w[p + "ln_1/g"], w[p + "ln_1/b"])
        qkv = h @ w[p + "attn/c_attn/w"][0] + w[p + "attn/c_attn/b"]
        q, k, v = np.split(qkv, 3, axis=-1)
        hd = q.shape[-1] // n_head
        q, k, v = (a.reshape(T, n_head, hd).transpose(1, 0, 2) for a in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(1, 0, 2).reshape(T, -1)
        x = x + y @ w[p + "attn/c_proj/w"][0] + w[p + "attn/c_proj/b"]
        h = layer_norm(x, w[p + "ln_2/g"], w[p + "ln_2/b"])
        x = (x + gelu(h @ w[p + "mlp/c_fc/w"][0] + w[p + "mlp/c_fc/b"]) @ w[p + "mlp/c_proj/w"][0]
             + w[p + "mlp/c_proj/b"])
    x = layer_norm(x, w["ln_f/g"], w["ln_f/b"])
    return x @ w["wte"].T


def tf_fixture_values():
    with np.load(TINY_TF / "values.npz", allow_pickle=False) as z:
        return {k.removeprefix("model/"): z[k] for k in z.files}  # stored with TF's "model/" scope


# ----------------------------------------------------------------------------------------------
# CRC-32C straight from its definition: the reference for formats.crc32c


def crc32c_reference(data: bytes) -> int:
    """CRC-32C one byte at a time, straight from its definition (reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Tiny BPE files, made the way OpenAI's are, so tokenizer and CLI tests need no download


def gpt2_byte_alphabet():
    """GPT-2's byte -> character table (an independent rewrite of OpenAI's bytes_to_unicode)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = keep + [256 + n for n in range(256 - len(keep))]
    order = keep + [b for b in range(256) if b not in keep]  # ids follow this order
    return {b: chr(c) for b, c in zip(order, chars)}, order


TINY_MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def write_tiny_bpe(folder, names=("encoder.json", "vocab.bpe")):
    alphabet, order = gpt2_byte_alphabet()
    encoder = {alphabet[b]: i for i, b in enumerate(order)}
    for line in TINY_MERGES:
        encoder[line.replace(" ", "")] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_text(json.dumps(encoder))
    (folder / names[1]).write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    return encoder


TINY_VOCAB = 256 + len(TINY_MERGES) + 1


@pytest.fixture
def tiny_tokenizer(tmp_path):
    write_tiny_bpe(tmp_path / "bpe")
    return gpt2.load_tokenizer(tmp_path / "bpe")


# ----------------------------------------------------------------------------------------------
# Tiny models, OpenAI's and Hugging Face's layouts, and parameter counts by hand


def random_tensors(cfg, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32)
            for name, shape in gpt2.checkpoint_shapes(cfg).items()}


def tiny_cfg(**kw):
    base = dict(vocab_size=TINY_VOCAB, context_length=32, emb_dim=16, n_heads=2, n_layers=2)
    base.update(kw)
    return gpt2.GPTConfig(**base)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A complete tiny model folder in OpenAI's layout: weights, hparams and BPE files."""
    folder = tmp_path / "tiny-gpt2"
    gpt2.write_model_folder(folder, tiny_cfg(), random_tensors(tiny_cfg()))
    write_tiny_bpe(folder)
    return folder


def copy_tiny_tf(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY_TF, folder)
    return folder


def to_hf_layout(w, with_buffers=True):
    """OpenAI names -> Hugging Face GPT-2 names, written out by hand as an independent reference."""
    out = {"wte.weight": w["wte"], "wpe.weight": w["wpe"], "ln_f.weight": w["ln_f/g"], "ln_f.bias": w["ln_f/b"]}
    n_layer = sum(1 for k in w if k.endswith("/ln_1/g"))
    for i in range(n_layer):
        for tf_name, hf_name in [("ln_1/g", "ln_1.weight"), ("ln_1/b", "ln_1.bias"), ("ln_2/g", "ln_2.weight"),
                                 ("ln_2/b", "ln_2.bias"), ("attn/c_attn/w", "attn.c_attn.weight"),
                                 ("attn/c_attn/b", "attn.c_attn.bias"), ("attn/c_proj/w", "attn.c_proj.weight"),
                                 ("attn/c_proj/b", "attn.c_proj.bias"), ("mlp/c_fc/w", "mlp.c_fc.weight"),
                                 ("mlp/c_fc/b", "mlp.c_fc.bias"), ("mlp/c_proj/w", "mlp.c_proj.weight"),
                                 ("mlp/c_proj/b", "mlp.c_proj.bias")]:
            a = w[f"h{i}/{tf_name}"]
            out[f"h.{i}.{hf_name}"] = a[0] if a.ndim == 3 else a  # HF's Conv1D weight is (in, out)
        n_ctx = w["wpe"].shape[0]
        if with_buffers:
            out[f"h.{i}.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]  # a buffer
    return out


def hand_count(cfg):
    """GPT-2's parameters: embeddings + per block (4 C^2 attention + 8 C^2 MLP + 13 C biases/norms)
    + the final norm; the output head is the token embedding, so it adds nothing."""
    C = cfg.emb_dim
    return cfg.vocab_size * C + cfg.context_length * C + cfg.n_layers * (12 * C * C + 13 * C) + 2 * C


def lora_count(cfg, rank, targets="all"):
    """Hand count: each adapted (in, out) Linear adds rank * (in + out)."""
    C = cfg.emb_dim
    per_block = {"W_query": 2 * C, "W_key": 2 * C, "W_value": 2 * C, "out_proj": 2 * C,
                 "ff.layers.0": 5 * C, "ff.layers.2": 5 * C}
    names = per_block if targets == "all" else targets
    return cfg.n_layers * rank * sum(per_block[n] for n in names)


# ----------------------------------------------------------------------------------------------
# A local HTTP server on the loopback address, for the download tests


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves self.server.files; honours "Range: bytes=N-"; can cut a response short once."""

    def do_GET(self):
        body = self.server.files.get(self.path)
        self.server.requests.append((self.path, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        for key, value in self.server.extra_headers.get(self.path, {}).items():
            self.send_header(key, value)
        if self.path in self.server.no_length:  # the body ends when the connection closes
            self.close_connection = True
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])  # and it closes early
            return
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.server.cut_once.pop(self.path, False):
            self.wfile.write(body[start:start + (len(body) - start) // 2])  # then hang up
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.files, server.requests, server.cut_once, server.extra_headers, server.no_length = {}, [], {}, {}, set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def url_of(server, path):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


# ----------------------------------------------------------------------------------------------
# LoRA classifiers and adapter files, built as train.py builds them


# What train.py stores beside the tensors (lora.ADAPTER_SCHEMA's keys, less those taken from the model)
ADAPTER_META = {"targets": "all", "labels": ["ham", "spam"], "max_length": 8, "threshold": 0.5, "precision": "fp32",
                "config": {"vocab_size": 262, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2}}


def tiny_classifier(rank=4, alpha=8, targets=None, n_classes=2, seed=0, cfg=None, lora_seed=None):
    """A tiny GPT-2 with LoRA injected, frozen, and a fresh classification head, as train.py builds it.
    seed fixes the "pretrained" weights, lora_seed (default: seed) the adapter's and head's init."""
    torch.manual_seed(seed)
    model = gpt2.GPTModel(cfg or tiny_cfg())
    torch.manual_seed(seed if lora_seed is None else lora_seed)
    return lora.build_classifier(model, n_classes, rank=rank, alpha=alpha, targets=targets)


def train_steps(model, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, model.cfg.vocab_size, (4, 10), generator=gen)
        labels = torch.randint(0, model.out_head.out_features, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(ids)[:, -1, :], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def adapter_file(path, meta_changes=None, tensor_changes=None):
    """A valid adapter file, then its metadata and tensors changed as given, written raw."""
    model = tiny_classifier()
    lora.save_adapter(model, path, ADAPTER_META)
    tensors, header = formats.read_safetensors(path, with_metadata=True)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    header = dict(header)
    for key, value in (meta_changes or {}).items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value if key in ("format", "version") else json.dumps(value)
    for name, fn in (tensor_changes or {}).items():
        fn(tensors[name])
    path.unlink()
    formats.write_safetensors(tensors, path, metadata=header)
    return path


# ----------------------------------------------------------------------------------------------
# Messages, and a model folder, a messages file and trained adapters made once per test module


def synthetic_messages(n_ham=60, n_spam=20):
    """Unique, recognisable messages: the text says what the label is and which one it is."""
    ham = [(f"hey are we still on for lunch {i} ok", 0) for i in range(n_ham)]
    spam = [(f"WIN a FREE prize {i} now call 0900 " + "x " * (i % 7), 1) for i in range(n_spam)]
    return ham + spam


def write_sms_file(path, messages):
    path.write_text("".join(f"{'spam' if label else 'ham'}\t{text}\n" for text, label in messages), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model folder and a synthetic messages file, made once for the CLI tests."""
    root = tmp_path_factory.mktemp("cli")
    gpt2.write_model_folder(root / "model", tiny_cfg(), random_tensors(tiny_cfg()))
    write_tiny_bpe(root / "model")
    write_sms_file(root / "sms.txt", synthetic_messages(60, 20))
    return root


# fp32: the same numbers on every machine (--precision auto picks bf16 only where it measures faster)
TRAIN_ARGS = ["--epochs", "3", "--rank", "4", "--lr", "1e-2", "--log-every", "2", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(workdir):
    result = run_script(HERE / "train.py", "--model-dir", workdir / "model", "--data", workdir / "sms.txt",
                        *TRAIN_ARGS, "--eval-unused", "--out", workdir / "a.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result, workdir / "a.pt"


@pytest.fixture(scope="module")
def hostile(workdir):
    """workdir's tiny model and messages, and one adapter trained on them, made once."""
    root = workdir
    # in-process: ~1 s instead of ~3 s for a subprocess
    train.main(["--model-dir", str(root / "model"), "--data", str(root / "sms.txt"), "--epochs", "1",
                "--rank", "2", "--precision", "fp32", "--out", str(root / "a.safetensors")])
    return root
