"""Tests for the GPT-2 + LoRA spam classifier: offline, on tiny models and data the tests make.

The references are independent of the code under test: a plain numpy forward pass of GPT-2,
checkpoints that real TensorFlow wrote (testdata/), hand-computed parameter counts, and the
published token ids of GPT-2's tokenizer. They live in conftest.py, with the shared fixtures.

The sections follow the product files: gpt2.py, formats.py, cli.py, lora.py, data.py, train.py,
predict.py, bench.py.

Usage:
    python -m pytest -q
"""

import argparse
import codecs
import csv
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

import bench
import cli
import data
import formats
import gpt2
import lora
import predict
import train
from conftest import (
    ADAPTER_META,
    HERE,
    SHARED,
    TESTDATA,
    TINY_TF,
    TINY_VOCAB,
    TRAIN_ARGS,
    adapter_file,
    copy_tiny_tf,
    crc32c_reference,
    hand_count,
    lora_count,
    numpy_gpt2,
    one_line,
    random_tensors,
    run_main,
    run_script,
    synthetic_messages,
    tf_fixture_values,
    tiny_cfg,
    tiny_classifier,
    to_hf_layout,
    train_steps,
    url_of,
    write_sms_file,
    write_tiny_bpe,
)

# ----------------------------------------------------------------------------------------------
# gpt2.py: the model, its attention, and bf16 against fp32


@pytest.mark.parametrize("size, expected", [("124M", 124_439_808), ("355M", 354_823_168),
                                            ("774M", 774_030_080), ("1558M", 1_557_611_200)])
def test_four_sizes_build_on_meta_with_published_parameter_counts(size, expected):
    with torch.device("meta"):
        model = gpt2.GPTModel(gpt2.GPT2_SIZES[size])
    assert hand_count(gpt2.GPT2_SIZES[size]) == expected
    assert sum(p.numel() for p in model.parameters()) == expected


def test_output_head_is_the_token_embedding():
    model = gpt2.GPTModel(tiny_cfg())
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.bias is None


def test_module_tree_uses_the_course_names():
    with torch.device("meta"):
        text = str(gpt2.GPTModel(gpt2.GPT2_SIZES["124M"]))
    for line in ["(tok_emb): Embedding(50257, 768)", "(pos_emb): Embedding(1024, 768)", "(drop_emb): Dropout",
                 "(trf_blocks): Sequential(", "(att): MultiHeadAttention(",
                 "(W_query): Linear(in_features=768, out_features=768, bias=True)", "(W_key): Linear(",
                 "(W_value): Linear(", "(out_proj): Linear(", "(ff): FeedForward(", "(layers): Sequential(",
                 "(norm1): LayerNorm((768,), eps=1e-05", "(norm2): LayerNorm(", "(drop_shortcut): Dropout",
                 "(final_norm): LayerNorm(", "(out_head): Linear(in_features=768, out_features=50257, bias=False)",
                 "GELU(approximate='tanh')"]:
        assert line in text, line


def test_sequence_longer_than_context_is_refused():
    model = gpt2.GPTModel(tiny_cfg(context_length=8))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_size_lists_valid_names():
    with pytest.raises(ValueError, match="124M.*gpt2-xl"):
        gpt2.resolve_size("125M")
    assert gpt2.resolve_size("gpt2-medium") == "355M"


def test_bf16_load_casts_only_the_big_matrices_once(tmp_path):
    cfg = tiny_cfg(emb_dim=32)
    tensors = random_tensors(cfg, seed=2, scale=0.05)
    gpt2.write_model_folder(tmp_path / "m", cfg, tensors)
    model = gpt2.load_gpt2(tmp_path / "m", dtype=torch.bfloat16)
    assert model.trf_blocks[0].att.W_query.weight.dtype == torch.bfloat16
    assert model.trf_blocks[1].ff.layers[2].bias.dtype == torch.bfloat16
    assert model.tok_emb.weight.dtype == torch.bfloat16 and model.pos_emb.weight.dtype == torch.float32
    assert model.trf_blocks[0].norm1.weight.dtype == torch.float32
    want = torch.from_numpy(tensors["h0/attn/c_attn/w"][0][:, :32].T.copy()).to(torch.bfloat16)
    assert torch.equal(model.trf_blocks[0].att.W_query.weight, want)  # rounded once from the file's float32


def test_bf16_and_fp32_forwards_agree_within_bf16_rounding(tmp_path):
    """bf16 keeps 8 significant bits: each matmul input is rounded by at most 2^-9 relative. Over two
    blocks of sums of 32-128 terms the errors add up randomly, so logits should differ by about
    1 % of their spread; 5 % is the bound (a wrong cast or a missed layer gives errors near 100 %)."""
    cfg = tiny_cfg(emb_dim=64, n_heads=4)
    gpt2.write_model_folder(tmp_path / "m", cfg, random_tensors(cfg, seed=4, scale=0.1))
    fp32, bf16 = gpt2.load_gpt2(tmp_path / "m"), gpt2.load_gpt2(tmp_path / "m", dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cli.autocast_for(torch.device("cpu"), "bf16"):
        low = bf16(ids).float()
    with torch.no_grad():
        full = fp32(ids)
    assert (low - full).abs().max() <= 0.05 * full.std()
    assert (low - full).abs().max() > 0  # bf16 really ran


def test_causal_attention_written_out_is_the_equation():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g) for _ in range(3))
    got = gpt2.causal_attention(q, k, v).numpy()
    qn, kn, vn = (a.numpy().astype(np.float64) for a in (q, k, v))
    scores = qn @ kn.transpose(0, 1, 3, 2) / 2.0  # sqrt(d_head) = 2
    scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)  # token t sees 0..t only
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (weights / weights.sum(-1, keepdims=True)) @ vn, atol=1e-6, rtol=0)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, fused.numpy(), atol=1e-6, rtol=0)


def test_bf16_training_forward_agrees_with_the_fused_kernel(tmp_path, monkeypatch):
    """With gradients on, a bf16 model on the CPU takes the written-out attention; without, the fused
    kernel. The written-out scores are rounded to bf16 and the fused ones are not, so the two differ
    by bf16 rounding (see above), never more."""
    cfg = tiny_cfg(emb_dim=64, n_heads=4)
    gpt2.write_model_folder(tmp_path / "m", cfg, random_tensors(cfg, seed=4, scale=0.1))
    model = gpt2.load_gpt2(tmp_path / "m", dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(gpt2, "causal_attention", lambda *a: calls.append(1) or written_out_attention(*a))
    ids = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with cli.autocast_for(torch.device("cpu"), "bf16"):
        written_out = model(ids).float()
        assert len(calls) == cfg.n_layers
        with torch.no_grad():
            fused = model(ids).float()
        assert len(calls) == cfg.n_layers  # not called again
    assert 0 < (written_out - fused).abs().max() <= 0.05 * fused.std()


written_out_attention = gpt2.causal_attention


def test_long_sequences_keep_the_fused_kernel_in_bf16(monkeypatch):
    """Beyond 256 tokens the written-out form, which stores T x T weights per head, is not used."""
    model = gpt2.GPTModel(tiny_cfg(context_length=300, n_layers=1))
    gpt2.cast_matmuls(model, torch.bfloat16)
    calls = []
    monkeypatch.setattr(gpt2, "causal_attention", lambda *a: calls.append(a[0].shape[-2]) or written_out_attention(*a))
    with cli.autocast_for(torch.device("cpu"), "bf16"):
        model(torch.zeros(1, 256, dtype=torch.long)).sum().backward()
        model(torch.zeros(1, 257, dtype=torch.long)).sum().backward()
    assert calls == [256]


# ----------------------------------------------------------------------------------------------
# gpt2.py: loading checkpoints and their configs, against the numpy reference


def test_missing_tensor_is_named(tmp_path):
    tensors = random_tensors(tiny_cfg())
    del tensors["h1/mlp/c_fc/b"]
    gpt2.write_model_folder(tmp_path, tiny_cfg(), tensors)
    with pytest.raises(formats.CheckpointError, match=r"missing h1/mlp/c_fc/b"):
        gpt2.load_gpt2(tmp_path)


def test_hparams_that_disagree_with_the_tensors_are_refused(tmp_path):
    folder = copy_tiny_tf(tmp_path)
    hp = json.loads((folder / "hparams.json").read_text())
    (folder / "hparams.json").write_text(json.dumps({**hp, "n_embd": 32}))
    with pytest.raises(formats.CheckpointError, match=r"does not fit.*n_embd=32"):
        gpt2.load_gpt2(folder)
    (folder / "hparams.json").write_text(json.dumps({**hp, "n_layer": 3}))
    with pytest.raises(formats.CheckpointError, match=r"missing h2/"):
        gpt2.load_gpt2(folder)


def test_a_conv1d_weight_of_three_real_dimensions_is_a_checkpoint_error(tmp_path):
    cfg = tiny_cfg()
    tensors = random_tensors(cfg)
    tensors["h0/mlp/c_fc/w"] = np.zeros((2, 16, 32), np.float32)  # (1, in, out) expected; same element count
    gpt2.write_model_folder(tmp_path, cfg, tensors)
    with pytest.raises(formats.CheckpointError, match="h0/mlp/c_fc/w of shape \\(2, 16, 32\\) does not fit"):
        gpt2.load_gpt2(tmp_path)


def test_folder_without_weights_names_the_files(tmp_path):
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 5, "n_ctx": 4, "n_embd": 4, "n_head": 1,
                                                       "n_layer": 1}))
    with pytest.raises(formats.CheckpointError, match="model.ckpt.index.*model.safetensors"):
        gpt2.load_gpt2(tmp_path)


def test_tensorflow_checkpoint_logits_equal_numpy_forward():
    model = gpt2.load_gpt2(TINY_TF)
    assert not model.training
    ids = [3, 17, 5, 63, 0, 42, 8]
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].numpy()
    want = numpy_gpt2(tf_fixture_values(), n_head=2, ids=ids)
    assert got.shape == (7, 64)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_hf_safetensors_gives_the_same_logits(tmp_path):
    formats.write_safetensors(to_hf_layout(tf_fixture_values()), tmp_path / "model.safetensors")
    shutil.copy(TINY_TF / "hparams.json", tmp_path)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        np.testing.assert_allclose(gpt2.load_gpt2(tmp_path)(ids).numpy(), gpt2.load_gpt2(TINY_TF)(ids).numpy(),
                                   atol=0, rtol=0)


def test_hf_folder_written_by_write_model_folder_loads_with_config_json(tmp_path):
    cfg = tiny_cfg()
    tensors = random_tensors(cfg, seed=5)
    gpt2.write_model_folder(tmp_path / "hf", cfg, tensors, fmt="hf")
    assert not (tmp_path / "hf" / "hparams.json").exists()
    ids = [5, 9, 200, 1]
    with torch.no_grad():
        got = gpt2.load_gpt2(tmp_path / "hf")(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(got, numpy_gpt2(tensors, cfg.n_heads, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("file_name", ["hparams.json", "config.json"])
@pytest.mark.parametrize("key, value", [("n_layer", 2_000_000_000), ("n_head", True), ("n_embd", 32.7),
                                        ("n_embd", "12"), ("n_layer", 0), ("n_layer", -1), ("n_head", None),
                                        ("n_embd", 16.0)])
def test_config_value_that_is_not_a_bounded_int_is_refused_before_allocation(tmp_path, monkeypatch, file_name,
                                                                             key, value):
    cfg = tiny_cfg()
    if file_name == "hparams.json":
        values = {"n_vocab": cfg.vocab_size, "n_ctx": cfg.context_length, "n_embd": 16, "n_head": 2, "n_layer": 2}
    else:
        values = {"vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": 16, "n_head": 2,
                  "n_layer": 2}
    values[key] = value
    # a complete folder, so that only the config can stop the load
    gpt2.write_model_folder(tmp_path, cfg, random_tensors(cfg), fmt="openai" if file_name == "hparams.json" else "hf")
    (tmp_path / file_name).write_text(json.dumps(values))
    with pytest.raises(formats.CheckpointError, match=repr(value).replace(".", r"\.")) as e:
        gpt2.read_config(tmp_path)
    assert file_name in str(e.value)

    def no_allocation(*a, **k):
        raise AssertionError("the model was built from a bad config")
    monkeypatch.setattr(gpt2, "GPTModel", no_allocation)
    with pytest.raises(formats.CheckpointError):
        gpt2.load_gpt2(tmp_path)


def test_config_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    for text in ("[1, 2]", "not json", '"x"', "{}"):
        (tmp_path / "hparams.json").write_text(text)
        with pytest.raises(formats.CheckpointError, match="hparams.json"):
            gpt2.read_config(tmp_path)


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16") / "model"
    tensors = {k: v.astype(np.float16) for k, v in random_tensors(tiny_cfg()).items()}
    gpt2.write_model_folder(folder, tiny_cfg(), tensors, fmt="hf")
    write_tiny_bpe(folder)
    return folder, tensors


def test_float16_safetensors_loads_as_float32_with_the_same_values(fp16_model, tmp_path):
    folder, tensors = fp16_model
    model = gpt2.load_gpt2(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.tok_emb.weight, torch.from_numpy(tensors["wte"].astype(np.float32)))
    # the same weights stored as float32 give the same logits
    gpt2.write_model_folder(tmp_path / "f32", tiny_cfg(), {k: v.astype(np.float32) for k, v in tensors.items()},
                            fmt="hf")
    ids = torch.tensor([[1, 5, 9, 100]])
    with torch.no_grad():
        assert torch.allclose(model(ids), gpt2.load_gpt2(tmp_path / "f32")(ids), atol=1e-6)


def test_float16_model_trains_and_predicts(fp16_model, hostile, tmp_path, capsys):
    folder, _ = fp16_model
    out = tmp_path / "a.safetensors"
    train.main([str(a) for a in ["--model-dir", folder, "--data", hostile / "sms.txt", "--epochs", "1",
                                 "--rank", "2", "--precision", "fp32", "--out", out]])
    predict.main(["--precision", "fp32", "--adapter", str(out), "--json", "hello there"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= row["spam_probability"] <= 1


def test_deeply_nested_json_in_config_or_adapter_is_one_line(tmp_path, workdir, capsys):
    folder = tmp_path / "m"
    shutil.copytree(workdir / "model", folder)
    (folder / "hparams.json").write_text("[" * 100_000)
    code, err = run_main(gpt2.main, ["--model-dir", folder, "hi"], capsys)
    assert code == 2 and "not a GPT-2 hparams.json" in err and one_line(err)
    model = tiny_classifier()
    lora.save_adapter(model, tmp_path / "a.safetensors", ADAPTER_META)
    tensors = formats.read_safetensors(tmp_path / "a.safetensors")
    header = {"format": lora.ADAPTER_FORMAT, "version": str(lora.ADAPTER_VERSION), "rank": "[" * 100_000}
    formats.write_safetensors({k: np.asarray(v) for k, v in tensors.items()}, tmp_path / "deep.safetensors", header)
    code, err = run_main(predict.main, ["--adapter", tmp_path / "deep.safetensors", "hi"], capsys)
    assert code == 2 and "not a readable adapter file" in err and one_line(err)


def test_fingerprint_is_the_same_for_openai_and_hf_files_and_both_precisions(tmp_path):
    cfg, tensors = tiny_cfg(), random_tensors(tiny_cfg(), seed=3)
    gpt2.write_model_folder(tmp_path / "tf", cfg, tensors)
    gpt2.write_model_folder(tmp_path / "hf", cfg, tensors, fmt="hf")
    prints = {gpt2.load_gpt2(tmp_path / "tf").weights_fingerprint, gpt2.load_gpt2(tmp_path / "hf").weights_fingerprint,
              gpt2.load_gpt2(tmp_path / "tf", dtype=torch.bfloat16).weights_fingerprint}
    assert len(prints) == 1
    tensors["h1/mlp/c_proj/w"][0, 0, 0] += 1.0  # one sampled value of one tensor differs
    gpt2.write_model_folder(tmp_path / "other", cfg, tensors)
    assert gpt2.load_gpt2(tmp_path / "other").weights_fingerprint not in prints


def test_folder_with_both_weight_formats_is_refused(tmp_path):
    cfg, tensors = tiny_cfg(), random_tensors(tiny_cfg())
    gpt2.write_model_folder(tmp_path, cfg, tensors)
    gpt2.write_model_folder(tmp_path, cfg, random_tensors(cfg, seed=9), fmt="hf")
    with pytest.raises(formats.CheckpointError, match="both OpenAI's checkpoint files and a model.safetensors"):
        gpt2.load_gpt2(tmp_path)


# ----------------------------------------------------------------------------------------------
# gpt2.py: tokenizer


def test_tiny_bpe_merges_and_round_trips(tmp_path):
    encoder = write_tiny_bpe(tmp_path)
    tok = gpt2.load_tokenizer(tmp_path)
    assert tok.encode_ordinary("hell") == [encoder["hell"]]
    assert tok.encode_ordinary(" world")[0] == encoder["Ġw"]
    assert tok.eot_token == encoder["<|endoftext|>"] == TINY_VOCAB - 1
    for text in ["hello world", "Ünïcödé £5 — 'quoted' \x92 tabs\tand\nnewlines", "  spaces  "]:
        assert tok.decode(tok.encode_ordinary(text)) == text


def test_hf_tokenizer_file_names_are_accepted(tmp_path):
    encoder = write_tiny_bpe(tmp_path, names=("vocab.json", "merges.txt"))
    assert gpt2.load_tokenizer(tmp_path).encode_ordinary("he") == [encoder["he"]]


def test_merges_that_disagree_with_the_vocabulary_are_refused(tmp_path):
    write_tiny_bpe(tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nl l\nh e\n")
    with pytest.raises(formats.CheckpointError, match="merge 1"):
        gpt2.load_tokenizer(tmp_path)


def test_vocabulary_outside_the_byte_alphabet_is_refused(tmp_path):
    encoder = write_tiny_bpe(tmp_path)
    encoder["a b"] = len(encoder)  # a raw space: GPT-2 writes it as "Ġ"
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    with pytest.raises(formats.CheckpointError, match="' ' is outside GPT-2's byte alphabet"):
        gpt2.load_tokenizer(tmp_path)


@pytest.mark.skipif(not (SHARED / "gpt2-bpe" / "encoder.json").exists(), reason="../shared/data/gpt2-bpe absent")
def test_real_gpt2_bpe_gives_openai_token_ids():
    tok = gpt2.load_tokenizer(SHARED / "gpt2-bpe")
    assert tok.encode_ordinary("hello world") == [31373, 995]
    assert tok.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.n_vocab == 50257


@pytest.mark.skipif(not (SHARED / "gpt2-bpe" / "encoder.json").exists() or not (SHARED / "SMSSpamCollection").exists(),
                    reason="../shared/data absent")
def test_real_bpe_encodes_every_sms_like_tiktokens_own_gpt2_definition():
    """tiktoken's own recipe for get_encoding("gpt2"), with the hash-checked files read from disk."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(SHARED / "gpt2-bpe" / "vocab.bpe"), str(SHARED / "gpt2-bpe" / "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    reference = tiktoken.Encoding("gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    ours = gpt2.load_tokenizer(SHARED / "gpt2-bpe")
    texts = [text for text, _ in data.load_messages(SHARED / "SMSSpamCollection")]
    texts += ["", " ", "  leading", "trailing  ", "tab\there", "new\nline", "I'm they're we've", "£1,000,000!!",
              "\x92smart\x94 quotes", "emoji 🎉 and 日本語", "&lt;#&gt;", "<|endoftext|> as text"]
    assert all(ours.encode_ordinary(t) == reference.encode_ordinary(t) for t in texts)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    gpt2.write_model_folder(tmp_path, tiny_cfg(vocab_size=100), random_tensors(tiny_cfg(vocab_size=100)))
    write_tiny_bpe(tmp_path)
    with pytest.raises(formats.CheckpointError, match="tokenizer has 262 tokens but the model only 100"):
        gpt2.load_model_and_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------
# gpt2.py: download, from a local HTTP server that stands in for OpenAI's


def serve_tiny_release(http_server, tmp_path, monkeypatch):
    """A tiny model in OpenAI's layout, served where OPENAI_URL points; its files' bytes as a dict."""
    gpt2.write_model_folder(tmp_path / "release", tiny_cfg(), random_tensors(tiny_cfg()))
    write_tiny_bpe(tmp_path / "release")
    files = {name: (tmp_path / "release" / name).read_bytes() for name in gpt2.OPENAI_FILES}
    for name, body in files.items():
        http_server.files[f"/gpt-2/models/124M/{name}"] = body
    monkeypatch.setattr(gpt2, "OPENAI_URL", url_of(http_server, "/gpt-2/models/{size}/{file}"))
    # the pinned hashes are those of OpenAI's real files: pin the tiny release's instead
    monkeypatch.setattr(gpt2, "KNOWN_SHA256", {name: hashlib.sha256(files[name]).hexdigest()
                                               for name in ("encoder.json", "vocab.bpe")})
    return files


def test_download_gpt2_fetches_the_six_files_once(http_server, tmp_path, monkeypatch):
    files = serve_tiny_release(http_server, tmp_path, monkeypatch)
    folder = gpt2.download_gpt2("gpt2-small", cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "gpt2" / "124M"
    assert sorted(p.name for p in folder.iterdir()) == sorted(gpt2.OPENAI_FILES)
    assert "model.ckpt.meta" not in gpt2.OPENAI_FILES  # the loader never reads it
    assert all((folder / name).read_bytes() == body for name, body in files.items())
    count = len(http_server.requests)
    gpt2.download_gpt2("124M", cache_dir=tmp_path / "cache")
    assert len(http_server.requests) == count == 6


def test_a_data_file_that_fails_its_crc_never_gets_its_name(http_server, tmp_path, monkeypatch):
    files = serve_tiny_release(http_server, tmp_path, monkeypatch)
    data_name = "model.ckpt.data-00000-of-00001"
    broken = bytearray(files[data_name])
    broken[len(broken) // 2] ^= 0x01  # one bit inside some tensor
    http_server.files[f"/gpt-2/models/124M/{data_name}"] = bytes(broken)
    with pytest.raises(cli.DownloadError, match="arrived corrupt.*fails its CRC-32C check.*run the command again"):
        gpt2.download_gpt2("124M", cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / "gpt2" / "124M"
    assert not (folder / data_name).exists() and not (folder / (data_name + ".part")).exists()


def test_a_pinned_file_with_other_bytes_is_refused(http_server, tmp_path, monkeypatch):
    serve_tiny_release(http_server, tmp_path, monkeypatch)
    http_server.files["/gpt-2/models/124M/vocab.bpe"] = b"#version: 0.2\nh e\n"
    with pytest.raises(cli.DownloadError, match="sha256 is not the expected"):
        gpt2.download_gpt2("124M", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "gpt2" / "124M" / "vocab.bpe").exists()


def test_download_without_network_says_how_to_use_model_dir(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(gpt2, "OPENAI_URL", f"http://127.0.0.1:{port}/{{size}}/{{file}}")
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    with pytest.raises(cli.DownloadError, match="--model-dir"):
        gpt2.download_gpt2("124M", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# gpt2.py: command line


def test_gpt2_cli_greedy_continuation_matches_argmax(tiny_model_dir):
    result = run_script("gpt2.py", "--model-dir", tiny_model_dir, "--max-new-tokens", "4", "hello")
    assert result.returncode == 0, result.stderr
    tok = gpt2.load_tokenizer(tiny_model_dir)
    model = gpt2.load_gpt2(tiny_model_dir)
    ids = tok.encode_ordinary("hello")
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert result.stdout.rstrip("\n") == tok.decode(ids)


@pytest.mark.parametrize("args, message", [
    (["--model", "2B", "hi"], "unknown GPT-2 size '2B'"),
    (["--model-dir", "/nonexistent/folder", "hi"], "does not exist"),
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["   "], "prompt is empty"),
])
def test_gpt2_cli_bad_input_is_one_line_and_exit_2(args, message, capsys):
    code, err = run_main(gpt2.main, args, capsys)
    assert code == 2 and message in err and one_line(err)


def test_gpt2_cli_missing_tokenizer_file_is_named(tiny_model_dir):
    (tiny_model_dir / "vocab.bpe").unlink()
    result = run_script("gpt2.py", "--model-dir", tiny_model_dir, "hi")
    assert result.returncode == 2 and "vocab.bpe" in result.stderr and "Traceback" not in result.stderr


def test_gpt2_cli_keeps_the_last_context_tokens_of_a_long_prompt(tiny_model_dir):
    result = run_script("gpt2.py", "--model-dir", tiny_model_dir, "--max-new-tokens", "1", "x" * 100)
    assert result.returncode == 0, result.stderr
    assert "keeping the last 32" in result.stderr


# ----------------------------------------------------------------------------------------------
# formats.py: TensorFlow checkpoints and CRC-32C


def test_reader_returns_exactly_what_tensorflow_wrote():
    got = formats.read_tf_checkpoint(TINY_TF)
    want = {f"model/{k}": v for k, v in tf_fixture_values().items()}
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
        assert np.array_equal(got[name], want[name]), name
    assert got["model/h0/attn/c_attn/w"].shape == (1, 16, 48)


def test_reader_handles_tensorflow_dtypes_scalars_and_empty_tensors():
    got = formats.read_tf_checkpoint(TESTDATA / "tf-dtypes" / "model.ckpt")
    assert np.array_equal(got["a/float64"], np.arange(6, dtype=np.float64).reshape(2, 3) / 7)
    assert np.array_equal(got["a/float16"], np.linspace(-2, 2, 5).astype(np.float16))
    assert got["b/int32"].tolist() == [[1, -2], [3, 2**31 - 1]]
    assert got["b/int64"].tolist() == [-(2**40), 5]
    assert got["c/bool"].tolist() == [True, False, True]
    assert got["c/scalar"].shape == () and float(got["c/scalar"]) == 3.5
    assert got["c/empty"].shape == (0, 4)


def test_writer_and_reader_round_trip_over_many_blocks(tmp_path):
    rng = np.random.default_rng(1)
    # long shared prefixes and a tiny block size exercise prefix compression and the index block
    tensors = {f"model/h{i}/attn/c_attn/{'w' if i % 2 else 'b'}": rng.standard_normal((i % 4 + 1, 3)).astype(np.float32)
               for i in range(40)}
    tensors["model/zz/int"] = np.arange(5, dtype=np.int64)
    formats.write_tf_checkpoint(tensors, tmp_path / "model.ckpt", block_size=64)
    index = (tmp_path / "model.ckpt.index").read_bytes()
    assert index[-8:] == bytes.fromhex("57fb808b247547db")
    got = formats.read_tf_checkpoint(tmp_path / "model.ckpt.index")
    assert sorted(got) == sorted(tensors)
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())


def test_crc32c_matches_the_published_check_value():
    # CRC-32C check value from the Castagnoli CRC catalogue, and RFC 3720's 32 zero bytes
    assert formats.crc32c(b"123456789") == 0xE3069283
    assert formats.crc32c(bytes(32)) == 0x8A9136AA


def test_truncated_data_file_is_a_clear_error(tmp_path):
    folder = copy_tiny_tf(tmp_path)
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(formats.CheckpointError, match=r"data-00000-of-00001.*truncated"):
        gpt2.load_gpt2(folder)


def test_wrong_magic_is_a_clear_error(tmp_path):
    folder = copy_tiny_tf(tmp_path)
    index = folder / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-1] + b"\x00")
    with pytest.raises(formats.CheckpointError, match=r"model\.ckpt\.index: wrong magic"):
        formats.read_tf_checkpoint(folder)


def test_corrupt_index_block_fails_its_checksum(tmp_path):
    folder = copy_tiny_tf(tmp_path)
    index = folder / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0xFF  # a byte inside the first data block
    index.write_bytes(bytes(raw))
    with pytest.raises(formats.CheckpointError, match="checksum mismatch"):
        formats.read_tf_checkpoint(folder)


def test_truncated_index_is_a_clear_error(tmp_path):
    folder = copy_tiny_tf(tmp_path)
    index = folder / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:30])
    with pytest.raises(formats.CheckpointError, match="too short"):
        formats.read_tf_checkpoint(folder)


def test_vectorised_crc32c_equals_the_byte_loop_on_many_lengths():
    rng = np.random.default_rng(5)
    for n in (0, 1, 7, 63, 64, 65, 1023, 1024, 1025, 16 * 64 - 1, 16 * 64 * 16 + 3, 100_003):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert formats.crc32c(data) == formats.crc32c(data.tobytes()) == crc32c_reference(data.tobytes()), n
    view = rng.integers(0, 256, 10_000, dtype=np.uint8)[17:9_000]  # an offset slice, as of a memmap
    assert formats.crc32c(view) == crc32c_reference(view.tobytes())


def test_the_tensorflow_written_index_crcs_match_the_data():
    """TensorFlow itself wrote these checksums (testdata/), so this checks our CRC against TF's."""
    formats.verify_tf_data(TINY_TF / "model.ckpt.index", TINY_TF / "model.ckpt.data-00000-of-00001")
    assert all(crc is not None for *_, crc in list(formats._tf_entries(TINY_TF / "model.ckpt.index"))[1:])


@pytest.mark.skipif(not (SHARED / "openai-gpt2-124M" / "model.ckpt.index").exists(), reason="../shared/data absent")
def test_openai_124m_index_carries_a_crc_for_every_tensor():
    entries = formats._tf_entries(SHARED / "openai-gpt2-124M" / "model.ckpt.index")
    assert next(entries) == 1  # one data shard
    rows = list(entries)
    assert len(rows) == 148 and all(crc is not None for *_, crc in rows)
    assert sum(size for *_, size, _ in rows) == 497_759_232  # the data file's published size


# ----------------------------------------------------------------------------------------------
# formats.py: safetensors (the reader checks the whole header before it touches the data)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    formats.write_safetensors(to_hf_layout(tf_fixture_values()), tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-10])
    with pytest.raises(formats.CheckpointError, match="runs past the end"):
        formats.read_safetensors(tmp_path / "model.safetensors")


def raw_safetensors(header: dict, data: bytes, pad=True) -> bytes:
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


GOOD_TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64),
                "c": np.ones((2, 2), np.float16)}


def good_header():
    return {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]},
            "c": {"dtype": "F16", "shape": [2, 2], "data_offsets": [56, 64]}}


GOOD_DATA = b"".join(GOOD_TENSORS[k].tobytes() for k in "abc")


def with_entry(name, **change):
    header = good_header()
    header[name] = {**header[name], **change}
    return header


@pytest.mark.parametrize("header, data, tensor, message", [
    (with_entry("a", dtype="F8"), GOOD_DATA, "a", "dtype"),
    (with_entry("a", dtype=None), GOOD_DATA, "a", "dtype"),
    ({**good_header(), "a": [1, 2]}, GOOD_DATA, "a", "dtype"),
    (with_entry("a", shape=[-2, -3]), GOOD_DATA, "a", "shape"),
    (with_entry("a", shape=[True, 3]), GOOD_DATA, "a", "shape"),
    (with_entry("a", shape=[2.0, 3]), GOOD_DATA, "a", "shape"),
    (with_entry("a", shape="2,3"), GOOD_DATA, "a", "shape"),
    (with_entry("a", shape=[2, 4]), GOOD_DATA, "a", "does not fit"),
    (with_entry("a", data_offsets=[0]), GOOD_DATA, "a", "data_offsets"),
    (with_entry("a", data_offsets=[0, 24, 48]), GOOD_DATA, "a", "data_offsets"),
    (with_entry("a", data_offsets=[24, 0]), GOOD_DATA, "a", "data_offsets"),
    (with_entry("a", data_offsets=[False, 24]), GOOD_DATA, "a", "data_offsets"),
    (with_entry("a", data_offsets=[0, 24.0]), GOOD_DATA, "a", "data_offsets"),
    (with_entry("a", data_offsets=[-24, 0]), GOOD_DATA, "a", "data_offsets"),
    (with_entry("c", data_offsets=[56, 72], shape=[2, 4]), GOOD_DATA, "c", "past the end"),
    (with_entry("b", data_offsets=[16, 48]), GOOD_DATA, "", "overlaps|gap"),  # overlap with a
    (with_entry("c", data_offsets=[56, 60], shape=[2, 1]), GOOD_DATA[:60] + b"\0" * 4, "", "after the last"),
    (good_header(), GOOD_DATA + b"\0" * 8, "", "after the last"),  # trailing bytes
    ({k: v for k, v in good_header().items() if k != "b"}, GOOD_DATA, "", "gap"),  # a hole in the data
])
def test_safetensors_bad_entry_is_a_checkpoint_error_naming_file_and_tensor(tmp_path, header, data, tensor, message):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors(header, data))
    with pytest.raises(formats.CheckpointError, match=message) as e:
        formats.read_safetensors(path)
    assert str(path) in str(e.value)
    if tensor:
        assert f"'{tensor}'" in str(e.value)


@pytest.mark.parametrize("raw, message", [
    (b"", "not a safetensors"),
    (b"\x10\x00\x00", "not a safetensors"),
    (struct.pack("<Q", 10**12) + b"{}", "not a safetensors"),  # header length beyond the file
    (struct.pack("<Q", 2**64 - 1) + b"{}", "not a safetensors"),
    (struct.pack("<Q", 4) + b"[1] ", "not an object"),
    (struct.pack("<Q", 4) + b"\"x\" ", "not an object"),
    (struct.pack("<Q", 4) + b"{]  ", "not valid JSON"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
    (struct.pack("<Q", 20001) + b"[" * 20000 + b"]", "not valid JSON"),  # too deep to parse
    (raw_safetensors({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    (raw_safetensors({"__metadata__": [1]}, b""), "__metadata__"),
])
def test_safetensors_bad_framing_is_a_checkpoint_error(tmp_path, raw, message):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw)
    with pytest.raises(formats.CheckpointError, match=message) as e:
        formats.read_safetensors(path)
    assert str(path) in str(e.value)


def test_safetensors_duplicate_tensor_name_is_refused(tmp_path):
    blob = (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    with pytest.raises(formats.CheckpointError, match="twice"):
        formats.read_safetensors(path)


@pytest.mark.parametrize("shape", [[0, 10**30], [0] + [1] * 80, [10**30, 0], [0, 2**63]])
def test_safetensors_empty_tensor_with_absurd_shape_is_a_checkpoint_error(tmp_path, shape):
    """A zero-byte tensor may still claim a shape numpy cannot build: refused by the header check,
    not by a numpy ValueError (or a wrong-shaped load) later."""
    header = {"e": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors(header, GOOD_TENSORS["a"].tobytes()))
    try:
        tensors = formats.read_safetensors(path)
    except formats.CheckpointError as e:
        assert "'e'" in str(e)
    else:
        assert list(tensors["e"].shape) == shape  # loaded as declared, never silently reshaped


def test_safetensors_good_file_round_trips(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors(good_header(), GOOD_DATA))
    tensors = formats.read_safetensors(path)
    assert all(np.array_equal(tensors[k], GOOD_TENSORS[k]) and tensors[k].dtype == GOOD_TENSORS[k].dtype
               for k in GOOD_TENSORS)


def test_safetensors_fuzzed_headers_fail_only_with_checkpoint_error(tmp_path):
    """Random byte flips and splices in the length and header: the reader either raises
    CheckpointError or returns tensors that tile the data region exactly (never other bytes)."""
    original = raw_safetensors(good_header(), GOOD_DATA)
    header_end = len(original) - len(GOOD_DATA)
    rng = random.Random(10)
    path = tmp_path / "f.safetensors"
    loaded = refused = 0
    for i in range(1500):
        raw = bytearray(original)
        for _ in range(rng.choice([1, 1, 2, 4])):
            pos = rng.randrange(header_end)
            if rng.random() < 0.5:
                raw[pos] ^= 1 << rng.randrange(8)
            else:
                raw[pos] = rng.choice(b'{}[]",:0123456789-.eE truefalsnul\\')
        if rng.random() < 0.1:
            raw = raw[:rng.randrange(len(raw))]
        path.write_bytes(bytes(raw))
        try:
            header, _, start = formats.read_safetensors_header(path)
            tensors = formats.read_safetensors(path)
        except formats.CheckpointError:
            refused += 1
            continue
        loaded += 1
        data_region = bytes(raw[start:])
        assert sum(a.nbytes for a in tensors.values()) == len(data_region)
        for name, a in tensors.items():
            begin, end = header[name]["data_offsets"]
            assert a.tobytes() == data_region[begin:end]
            assert list(a.shape) == header[name]["shape"]
    assert refused > 100  # the fuzzing did reach the checks


# ----------------------------------------------------------------------------------------------
# cli.py: downloads, against a local HTTP server on the loopback address


def test_download_resumes_a_partial_file_with_a_range_request(http_server, tmp_path):
    body = os.urandom(300_000)
    http_server.files["/f.bin"] = body
    (tmp_path / "f.bin.part").write_bytes(body[:100_000])
    cli.download_file(url_of(http_server, "/f.bin"), tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert http_server.requests == [("/f.bin", "bytes=100000-")]
    assert not (tmp_path / "f.bin.part").exists()


def test_download_retries_a_cut_connection_and_resumes(http_server, tmp_path):
    body = os.urandom(3_000_000)  # cut after 1.5 MB, so at least one 1 MiB chunk was saved
    http_server.files["/f.bin"] = body
    http_server.cut_once["/f.bin"] = True
    cli.download_file(url_of(http_server, "/f.bin"), tmp_path / "f.bin", backoff=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    (first, first_range), (_, second_range) = http_server.requests
    assert first_range is None and int(second_range.removeprefix("bytes=").rstrip("-")) >= 1 << 20


def test_download_never_leaves_an_incomplete_file_under_its_name(http_server, tmp_path):
    http_server.files["/f.bin"] = os.urandom(50_000)
    http_server.cut_once["/f.bin"] = True
    with pytest.raises(cli.DownloadError):
        cli.download_file(url_of(http_server, "/f.bin"), tmp_path / "f.bin", retries=1, progress=False)
    assert not (tmp_path / "f.bin").exists()


def test_the_sha256_the_hub_announces_is_checked(http_server, tmp_path):
    body = os.urandom(10_000)
    http_server.files["/m.safetensors"] = body
    http_server.extra_headers["/m.safetensors"] = {"X-Linked-Etag": f'"{hashlib.sha256(b"other").hexdigest()}"'}
    with pytest.raises(cli.DownloadError, match="sha256"):
        cli.download_file(url_of(http_server, "/m.safetensors"), tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()
    http_server.extra_headers["/m.safetensors"] = {"X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"'}
    cli.download_file(url_of(http_server, "/m.safetensors"), tmp_path / "m.safetensors", progress=False)
    assert (tmp_path / "m.safetensors").read_bytes() == body


def test_a_transfer_without_length_that_stops_early_never_gets_its_name(http_server, tmp_path):
    http_server.files["/f.bin"] = os.urandom(50_000)
    http_server.no_length.add("/f.bin")
    with pytest.raises(cli.DownloadError, match="did not say how long"):
        cli.download_file(url_of(http_server, "/f.bin"), tmp_path / "f.bin", retries=1, progress=False)
    assert not (tmp_path / "f.bin").exists()


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "c"))
    assert cli.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(cli.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.default_cache_dir() == tmp_path / "xdg" / "gpt2-lora"


def closed_port():
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_host_ends_the_download_at_once_and_leaves_no_folders(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(cli.time, "sleep", sleeps.append)
    dest = tmp_path / "cache" / "gpt2" / "124M" / "f.bin"
    with pytest.raises(cli.DownloadError, match="cannot be reached"):
        cli.download_file(f"http://127.0.0.1:{closed_port()}/f.bin", dest, retries=3, progress=False)
    assert sleeps == []  # a refused connection is not retried
    assert list(tmp_path.iterdir()) == []  # the folders made for it are gone again


def test_fetch_all_tries_every_download_and_names_every_failure():
    calls = []

    def fails(name):
        def fetch():
            calls.append(name)
            raise cli.DownloadError(f"could not download {name}. Without internet, pass --{name}")
        return fetch
    with pytest.raises(cli.DownloadError) as info:
        cli.fetch_all(fails("data"), lambda: calls.append("ok") or 7, fails("model-dir"))
    assert calls == ["data", "ok", "model-dir"]
    assert str(info.value) == ("could not download data. Without internet, pass --data. Also, could not download "
                               "model-dir. Without internet, pass --model-dir")
    assert cli.fetch_all(lambda: 1, lambda: 2) == [1, 2]


# ----------------------------------------------------------------------------------------------
# cli.py: errors, signals, atomic writes, and precision chosen by measurement


@pytest.mark.parametrize("speedup, expected", [(4.6, "bf16"), (1.5, "bf16"), (1.2, "fp32"), (0.5, "fp32")])
def test_auto_precision_follows_the_measured_speedup(speedup, expected):
    precision, why = cli.choose_precision("auto", torch.device("cpu"), speedup=lambda device: speedup)
    assert precision == expected and (f"{speedup:.1f}x" in why or f"{speedup:.2f}x" in why)
    assert cli.choose_precision("fp32", torch.device("cpu"), speedup=lambda d: 9.9)[0] == "fp32"
    assert cli.choose_precision("bf16", torch.device("cpu"), speedup=lambda d: 0.1)[0] == "bf16"


def test_the_precision_probe_leaves_the_global_random_state_alone():
    torch.manual_seed(7)
    cli.bf16_speedup(torch.device("cpu"), m=8, k=8, n=8, runs=1)
    after_probe = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after_probe)  # so --precision auto trains like --precision bf16


@pytest.mark.parametrize("script", ["train.py", "predict.py", "data.py", "gpt2.py"])
def test_ctrl_c_while_importing_is_exit_130_and_one_line(script, tmp_path):
    args = {"train.py": ["--precision", "fp32", "--out", str(tmp_path / "a.safetensors")],
            "predict.py": ["--precision", "fp32", "hello"], "data.py": [], "gpt2.py": ["--help"]}[script]
    for delay in (0.2, 0.3, 0.45):  # at different points of the imports (numpy's and torch's swallow a SystemExit)
        proc = subprocess.Popen([sys.executable, script, *args], cwd=HERE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        assert proc.poll() is None, "the script ended before the interrupt"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (delay, err)
        assert one_line(err) and "interrupted" in err, (delay, err)
        assert not (tmp_path / "a.safetensors").exists()


def test_a_full_disk_while_saving_replaces_nothing(workdir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.safetensors"
    lora.save_adapter(tiny_classifier(), out, ADAPTER_META)  # an earlier run's adapter, to be replaced
    (tmp_path / "a.safetensors.metrics.json").write_text('{"run_id": "earlier", "history": []}\n')
    (tmp_path / "a.safetensors.curves.svg").write_text(train.curves_svg([(1.0, 0.5)], [], "earlier"))
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_writer = lora.adapter_writer

    def full_disk(*args, **kwargs):  # the adapter is the last file written
        write = real_writer(*args, **kwargs)

        def fail(f):
            write(f)
            raise OSError(28, "No space left on device")
        return fail
    monkeypatch.setattr(lora, "adapter_writer", full_disk)
    code, err = run_main(train.main, ["--model-dir", workdir / "model", "--data", workdir / "sms.txt", "--epochs", "1",
                                      "--rank", "2", "--precision", "fp32", "--out", out], capsys)
    assert code == 2 and "no space left" in err.lower() and one_line(err)
    # no temporary file left; the checkpoint of the last epoch stays, so the run can be resumed once there is room
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.checkpoint",
                                                         "a.safetensors.curves.svg", "a.safetensors.metrics.json"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in earlier} == earlier


def test_running_out_of_memory_is_one_line_and_a_bug_is_not_hidden(capsys, monkeypatch):
    def no_memory():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")
    with pytest.raises(SystemExit) as info:
        cli.run_cli(no_memory, "x.py")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "out of memory" in err and "smaller --batch-size" in err and one_line(err)
    monkeypatch.setattr(train, "run", lambda args: (_ for _ in ()).throw(MemoryError("no room")))
    with pytest.raises(SystemExit):
        train.main([])
    assert "or --gradient-checkpointing" in capsys.readouterr().err  # train.py's own tip
    with pytest.raises(SystemExit) as info:  # a DownloadError is a RuntimeError, but an expected one
        cli.run_cli(lambda: (_ for _ in ()).throw(cli.DownloadError("could not download x")), "x.py")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == "x.py: error: could not download x\n"
    with pytest.raises(RuntimeError, match="some bug"):
        cli.run_cli(lambda: (_ for _ in ()).throw(RuntimeError("some bug")), "x.py")


def test_stop_signal_during_the_renames_is_acted_on_after_all_of_them(tmp_path, monkeypatch):
    files = {tmp_path / "a.bin": b"a", tmp_path / "b.bin": b"b"}
    previous = signal.signal(signal.SIGTERM, cli._raise_stopped)  # as run_cli installs it
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        if not renamed:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between the first and the second rename
        real_replace(src, dst)
        renamed.append(Path(dst).name)
    monkeypatch.setattr(os, "replace", replace)
    try:
        with pytest.raises(cli.Stopped) as stop:
            cli.atomic_write_all(files)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143
    assert renamed == ["a.bin", "b.bin"] and all(p.read_bytes() == d for p, d in files.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temporary file left


def test_each_file_is_fsynced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or real_replace(a, b))
    cli.atomic_write_all({tmp_path / "x": b"1", tmp_path / "y": b"2"})
    assert events == [("fsync", "file"), ("fsync", "file"), ("replace", "x"), ("replace", "y"), ("fsync", "folder")]


def test_a_second_writer_waits_for_the_first_ones_renames(tmp_path):
    done = threading.Event()
    with cli._locked(tmp_path.resolve()):  # another writer is renaming its files into this folder
        writer = threading.Thread(target=lambda: (cli.atomic_write(tmp_path / "out.bin", b"B"), done.set()))
        writer.start()
        assert not done.wait(0.5)  # it wrote its temporary file, but may not rename it yet
        assert not (tmp_path / "out.bin").exists()
    writer.join(10)
    assert done.is_set() and (tmp_path / "out.bin").read_bytes() == b"B"


def test_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cli.default_cache_dir() == tmp_path / ".cache" / "gpt2-lora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.default_cache_dir() == tmp_path / "xdg" / "gpt2-lora"


def test_no_usable_home_says_to_set_the_cache(monkeypatch):
    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    with pytest.raises(ValueError, match=f"--cache-dir DIR or set {cli.CACHE_ENV}"):
        cli.default_cache_dir()


# ----------------------------------------------------------------------------------------------
# lora.py: the LoRA layers, injecting them, counting parameters, merging


def test_lora_layer_shapes_init_and_scaling():
    layer = lora.LoRALayer(12, 20, rank=3, alpha=6)
    assert layer.A.shape == (12, 3) and layer.B.shape == (3, 20)
    assert layer.rank == 3 and layer.alpha == 6 and layer.scaling == 2.0
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) == 36
    assert layer.A.abs().max() <= 1 / math.sqrt(3)  # kaiming_uniform(a=sqrt(5)) bound on fan_in = rank
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 5, 12)
    h = torch.randn(2, 5, 20)
    into = h.clone()
    assert layer(x, into=into) is into  # the in-place form LinearWithLoRA uses
    torch.testing.assert_close(into, h + 2.0 * x @ layer.A @ layer.B)


def test_lora_layer_called_as_in_the_course_returns_scaled_x_a_b():
    # the course's Exercise 1: LoRALayer(in_dim, out_dim, rank, alpha)(x) = (alpha / rank) x A B,
    # checked against numpy in float64 on numbers small enough to follow by hand
    layer = lora.LoRALayer(3, 2, 2, 4)  # scaling 4 / 2 = 2
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.B.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # x A = [4, 5]; [4, 5] B = [4 + 15, 8 + 20] = [19, 28]; times 2
    assert layer(x).tolist() == [[38.0, 56.0]]
    xs = np.random.default_rng(0).standard_normal((4, 3))
    want = 2.0 * xs @ layer.A.detach().double().numpy() @ layer.B.detach().double().numpy()
    np.testing.assert_allclose(layer(torch.tensor(xs, dtype=torch.float32)).detach().numpy(), want, rtol=1e-5)


def test_linear_with_lora_computes_w0x_plus_scaled_bax():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20)
    wrapped = lora.LinearWithLoRA(linear, rank=3, alpha=6)
    with torch.no_grad():
        wrapped.lora.B.normal_()
    A, B, W, b = wrapped.lora.A, wrapped.lora.B, linear.weight, linear.bias
    for x in (torch.randn(2, 5, 12), torch.randn(7, 12), torch.randn(12)):
        torch.testing.assert_close(wrapped(x), x @ W.T + b + 2.0 * (x @ A @ B))
    x = torch.randn(4, 12, requires_grad=True)  # gradients reach x, A and B, never W
    wrapped(x).square().sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


def test_lora_model_equals_base_model_at_init():
    torch.manual_seed(0)
    base = gpt2.GPTModel(tiny_cfg()).eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 9))
    with torch.no_grad():
        before = base(ids)
        lora.replace_linear_with_lora(base, rank=4, alpha=16)
        after = base(ids)
    assert torch.equal(before, after)


def test_one_step_moves_only_the_adapter_and_head():
    model = tiny_classifier()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora." in n or n.startswith("out_head.") for n in trained)
    assert len([n for n in trained if ".lora." in n]) == 2 * 6 * tiny_cfg().n_layers
    train_steps(model, steps=1)
    params = dict(model.named_parameters())
    for name, before in trained.items():
        assert not torch.equal(params[name], before), f"{name} did not change"
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} changed"
        assert params[name].grad is None, f"frozen {name} has a gradient"


@pytest.mark.parametrize("rank", [1, 8, 16])
def test_parameter_counts_of_124m_with_lora_on_every_linear(rank, capsys):
    cfg = gpt2.GPT2_SIZES["124M"]
    with torch.device("meta"):
        model = gpt2.GPTModel(cfg)
        assert lora.replace_linear_with_lora(model, rank=rank, alpha=16) == 72
        lora.freeze_and_activate_lora(model)
    assert lora_count(cfg, rank) == 165_888 * rank
    assert lora.count_parameters(model) == (165_888 * rank, 124_439_808 + 165_888 * rank)
    if rank == 16:
        lora.print_trainable_parameters(model)
        assert capsys.readouterr().out == ("trainable params: 2,654,208 || all params: 127,094,016 || "
                                           "trainable%: 2.09%\n")
        with torch.device("meta"):
            model.out_head = torch.nn.Linear(768, 2)
        assert lora.count_parameters(model) == (2_655_746, 127_095_554)


@pytest.mark.parametrize("rank", [1, 8, 16])
def test_parameter_counts_of_124m_with_query_and_value_only(rank):
    cfg = gpt2.GPT2_SIZES["124M"]
    with torch.device("meta"):
        model = gpt2.GPTModel(cfg)
        assert lora.replace_linear_with_lora(model, rank=rank, alpha=16, targets=["W_query", "W_value"]) == 24
        lora.freeze_and_activate_lora(model)
    assert lora_count(cfg, rank, ["W_query", "W_value"]) == 36_864 * rank
    assert lora.count_parameters(model)[0] == 36_864 * rank


def test_target_groups_pick_their_layers():
    for targets, expected in [("attn", 4), ("mlp", 2), ("W_query,W_value", 2), (["all"], 6), (["mlp", "W_key"], 3)]:
        model = gpt2.GPTModel(tiny_cfg())
        assert lora.replace_linear_with_lora(model, 2, 2, targets=targets) == expected * tiny_cfg().n_layers
    model = gpt2.GPTModel(tiny_cfg())
    lora.replace_linear_with_lora(model, 2, 2, targets="mlp")
    assert isinstance(model.trf_blocks[0].ff.layers[0], lora.LinearWithLoRA)
    assert isinstance(model.trf_blocks[0].att.W_query, torch.nn.Linear)
    assert isinstance(model.out_head, torch.nn.Linear)


def test_print_shows_lora_wrapped_layers():
    with torch.device("meta"):
        model = gpt2.GPTModel(gpt2.GPT2_SIZES["124M"])
        lora.replace_linear_with_lora(model, rank=16, alpha=16)
    text = str(model)
    assert ("        (W_query): LinearWithLoRA(\n"
            "          (linear): Linear(in_features=768, out_features=768, bias=True)\n"
            "          (lora): LoRALayer(rank=16, alpha=16)\n"
            "        )\n") in text
    assert "(out_head): Linear(in_features=768, out_features=50257, bias=False)" in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, alpha=1), "rank must be an integer >= 1"),
    (dict(rank=2.5, alpha=1), "rank must be an integer"),
    (dict(rank=True, alpha=1), "rank must be an integer"),
    (dict(rank=4, alpha=0), "alpha must be a number > 0"),
    (dict(rank=4, alpha=-1.0), "alpha must be a number > 0"),
    (dict(rank=4, alpha=4, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(rank=4, alpha=4, dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(rank=4, alpha=4, targets=["W_qery"]),
     "W_qery matches no .* such as W_key, W_query, W_value, ff.layers.0, ff.layers.2, out_head, out_proj"),
    (dict(rank=4, alpha=4, targets=""), "targets are empty"),
])
def test_bad_lora_settings_are_value_errors(kwargs, message):
    model = gpt2.GPTModel(tiny_cfg())
    with pytest.raises(ValueError, match=message):
        lora.replace_linear_with_lora(model, **kwargs)


def test_injecting_twice_matches_nothing_new():
    model = gpt2.GPTModel(tiny_cfg())
    lora.replace_linear_with_lora(model, 2, 2, targets="attn")
    with pytest.raises(ValueError, match="matches no unadapted"):
        lora.replace_linear_with_lora(model, 2, 2, targets="W_query")


def test_a_rank_larger_than_an_adapted_layer_is_refused_before_anything_changes():
    model = gpt2.GPTModel(tiny_cfg())  # every Linear is at least 16 wide
    with pytest.raises(ValueError, match=r"LoRA rank 17 is larger than trf_blocks.0.att.W_query \(16 -> 16\); "
                                         r"use a rank of at most 16"):
        lora.replace_linear_with_lora(model, rank=17, alpha=1)
    assert not lora.lora_layers(model)  # nothing half-wrapped
    assert lora.replace_linear_with_lora(model, rank=16, alpha=1) == 12


def test_merged_model_matches_unmerged_after_training():
    model = train_steps(tiny_classifier(), steps=3)
    assert any(torch.count_nonzero(m.B) for m in lora.lora_layers(model).values())
    ids = torch.randint(0, TINY_VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(ids)
        assert lora.merge_lora(model) == 6 * tiny_cfg().n_layers
        after = model(ids)
    assert not lora.lora_layers(model) and type(model.trf_blocks[0].att.W_query) is torch.nn.Linear
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_merge_of_a_bf16_model_is_formed_in_float32():
    linear = torch.nn.Linear(8, 6).to(torch.bfloat16)
    wrapped = lora.LinearWithLoRA(linear, rank=2, alpha=3)
    with torch.no_grad():
        wrapped.lora.B.normal_()
    w0 = linear.weight.detach().clone()
    expected = (w0.float() + 1.5 * (wrapped.lora.A @ wrapped.lora.B).T).to(torch.bfloat16)
    holder = torch.nn.Sequential(wrapped)
    lora.merge_lora(holder)
    assert holder[0].weight.dtype == torch.bfloat16 and torch.equal(holder[0].weight, expected)


def test_gradient_checkpointing_saves_less_and_gives_the_same_gradients():
    """Dropout on, so the recomputed forward must also draw the same dropout masks."""
    def gradients(checkpointing):
        model = tiny_classifier(cfg=tiny_cfg(drop_rate=0.2, n_layers=3)).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(7)
        ids = torch.randint(0, TINY_VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
        # bytes autograd keeps for the backward pass: the checkpointed blocks keep theirs out of sight
        # of this hook, so with checkpointing it sees only the embeddings, final norm and head
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = model(ids)[:, -1, :].logsumexp(-1).sum()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sum(saved)

    plain, plain_bytes = gradients(False)
    recomputed, recomputed_bytes = gradients(True)
    assert recomputed_bytes < plain_bytes / 3
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=name)
    assert any(plain[n].abs().sum() > 0 for n in plain if n.endswith(".B"))  # the test has gradients to compare


# ----------------------------------------------------------------------------------------------
# lora.py: adapter files and their metadata schema


def test_save_then_load_reproduces_outputs_exactly(tmp_path):
    model = train_steps(tiny_classifier(seed=0))
    lora.save_adapter(model, tmp_path / "a.pt", {**ADAPTER_META, "model": "tiny"})
    fresh = tiny_classifier(seed=0, lora_seed=123).eval()  # same base, other random A and head
    ids = torch.randint(0, TINY_VOCAB, (2, 8))
    with torch.no_grad():
        assert not torch.equal(fresh(ids), model(ids))
        meta = lora.load_adapter(fresh, tmp_path / "a.pt")
        assert torch.equal(fresh(ids), model(ids))
    assert meta["labels"] == ["ham", "spam"] and meta["rank"] == 4 and meta["alpha"] == 8
    assert not list(tmp_path.glob("*.tmp"))


def test_adapter_file_holds_only_lora_and_head(tmp_path):
    model = tiny_classifier()
    lora.save_adapter(model, tmp_path / "a.pt", ADAPTER_META)
    _, tensors = lora.read_adapter(tmp_path / "a.pt")
    assert all(".lora." in n or n.startswith("out_head.") for n in tensors)
    assert sum(t.numel() for t in tensors.values()) == lora.count_parameters(model)[0]


def test_rank16_adapter_of_124m_is_about_10_6_mb(tmp_path):
    with torch.device("meta"):
        model = gpt2.GPTModel(gpt2.GPT2_SIZES["124M"])
    model = model.to_empty(device="cpu")  # values are irrelevant here, only sizes
    lora.replace_linear_with_lora(model, rank=16, alpha=16)
    model.out_head = torch.nn.Linear(768, 2)
    lora.save_adapter(model, tmp_path / "a.pt", ADAPTER_META)
    size = (tmp_path / "a.pt").stat().st_size
    assert 2_655_746 * 4 <= size < 2_655_746 * 4 + 200_000  # 10.62 MB of float32 plus a small index


@pytest.mark.parametrize("change, message", [
    (dict(rank=8), "LoRA rank 4, but the model has rank 8"),
    (dict(alpha=16), "LoRA alpha 8, but the model has alpha 16"),
    (dict(targets="attn"), "other LoRA targets"),
    (dict(n_classes=3), "classification head of another size"),
    (dict(cfg=tiny_cfg(emb_dim=24)), "another model size"),
])
def test_loading_an_adapter_into_another_layout_fails_clearly(tmp_path, change, message):
    model = tiny_classifier()
    lora.save_adapter(model, tmp_path / "a.pt", ADAPTER_META)
    other = tiny_classifier(**{"rank": 4, "alpha": 8, **change})
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=message):
        lora.load_adapter(other, tmp_path / "a.pt")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # nothing half-loaded


def test_truncated_or_foreign_adapter_files_are_refused(tmp_path):
    model = tiny_classifier()
    lora.save_adapter(model, tmp_path / "a.pt", ADAPTER_META)
    raw = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    formats.write_safetensors({"some": np.zeros(2, np.float32)}, tmp_path / "other.pt")
    torch.save({"some": torch.zeros(2)}, tmp_path / "old.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name, message in [("cut.pt", "not a readable adapter"), ("other.pt", "not a LoRA adapter"),
                          ("text.pt", "not a readable adapter"), ("old.pt", "old pickle format.*retrain")]:
        with pytest.raises(ValueError, match=message):
            lora.load_adapter(model, tmp_path / name)
    with pytest.raises(FileNotFoundError):
        lora.load_adapter(model, tmp_path / "absent.pt")


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): what a malicious "model file" would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    victim = tmp_path / "pwned.txt"
    torch.save({"format": lora.ADAPTER_FORMAT, "payload": _CreatesAFile(victim)}, tmp_path / "evil.pt")
    assert not victim.exists()
    with pytest.raises(ValueError, match="old pickle format, which is never loaded"):
        lora.load_adapter(tiny_classifier(), tmp_path / "evil.pt")
    assert not victim.exists()


def full_meta():
    return {**ADAPTER_META, "rank": 4, "alpha": 8, "dropout": 0.0}


@pytest.mark.parametrize("change, message", [
    ({"rank": None}, "lacks 'rank'"),
    ({"max_length": None}, "lacks 'max_length'"),
    ({"max_length": 0}, "max_length is 0"),
    ({"max_length": -5}, "max_length is -5"),
    ({"max_length": 8.5}, "max_length is 8.5"),
    ({"max_length": True}, "max_length is True"),
    ({"rank": 0}, "rank is 0"),
    ({"rank": "4"}, "rank is '4'"),
    ({"alpha": float("nan")}, "alpha is nan"),
    ({"alpha": float("inf")}, "alpha is inf"),
    ({"threshold": 1.5}, "threshold is 1.5"),
    ({"threshold": float("nan")}, "threshold is nan"),
    ({"labels": ["ham", "ham"]}, "labels"),
    ({"config": {"emb_dim": 16}}, "config"),
    ({"config": {**ADAPTER_META["config"], "n_layers": True}}, "config"),
    ({"precision": "fp8"}, "precision"),
])
def test_adapter_meta_violation_is_a_value_error(change, message):
    meta = full_meta()
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    with pytest.raises(ValueError, match=message):
        lora.check_adapter_meta(meta, "x.safetensors")


def test_adapter_with_an_unknown_extra_key_is_read(tmp_path):
    path = adapter_file(tmp_path / "a.safetensors", {"written_by_a_newer_version": {"x": [1, 2]}})
    meta, tensors = lora.read_adapter(path)
    assert meta["written_by_a_newer_version"] == {"x": [1, 2]}
    lora.load_adapter(tiny_classifier(), path)


def test_adapter_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The first byte of a safetensors file is its header length modulo 256: 0x80, a pickle's
    first byte, must not make a valid adapter unreadable."""
    for n in range(300):
        path = adapter_file(tmp_path / "a.safetensors", {"note": "x" * n})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 128 modulo 256")
    meta, _ = lora.read_adapter(path)
    assert meta["note"] == "x" * n


@pytest.mark.parametrize("changes, message", [
    ({"rank": None}, "lacks 'rank'"),
    ({"max_length": 0}, "max_length is 0"),
    ({"max_length": -3}, "max_length is -3"),
])
def test_adapter_file_with_bad_metadata_is_refused(tmp_path, changes, message):
    path = adapter_file(tmp_path / "a.safetensors", changes)
    with pytest.raises(ValueError, match=message):
        lora.read_adapter(path)


def test_adapter_metadata_that_is_not_json_is_a_value_error(tmp_path):
    path = tmp_path / "a.safetensors"
    adapter_file(path)
    tensors, header = formats.read_safetensors(path, with_metadata=True)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    path.unlink()
    formats.write_safetensors(tensors, path, metadata={**header, "rank": "{not json"})
    with pytest.raises(ValueError, match="not a readable adapter"):
        lora.read_adapter(path)


def test_nan_adapter_is_refused(tmp_path):
    name = next(n for n in lora.adapter_state(tiny_classifier()) if n.endswith(".lora.B"))
    path = adapter_file(tmp_path / "a.safetensors", tensor_changes={name: lambda a: a.__setitem__((0, 0), np.nan)})
    with pytest.raises(ValueError, match="NaN"):
        lora.read_adapter(path)


def test_saving_a_nan_adapter_is_refused_and_writes_nothing(tmp_path):
    model = tiny_classifier()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith(".lora.A")).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        lora.save_adapter(model, tmp_path / "a.safetensors", ADAPTER_META)
    assert list(tmp_path.iterdir()) == []


def test_old_pickle_adapter_is_refused_with_a_line_saying_to_retrain(tmp_path, capsys):
    torch.save({"A": torch.zeros(2)}, tmp_path / "old.pth")
    with pytest.raises(ValueError, match="retrain"):
        lora.read_adapter(tmp_path / "old.pth")
    code, err = run_main(predict.main, ["--precision", "fp32", "--adapter", tmp_path / "old.pth", "hi"], capsys)
    assert code == 2 and one_line(err) and "retrain" in err


def test_adapter_with_integer_tensors_is_refused_not_cast(tmp_path):
    path = adapter_file(tmp_path / "a.safetensors")
    tensors, header = formats.read_safetensors(path, with_metadata=True)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    name = next(iter(tensors))
    tensors[name] = tensors[name].astype(np.int64)
    path.unlink()
    formats.write_safetensors(tensors, path, metadata=header)
    with pytest.raises(ValueError, match=f"tensor {re.escape(name)} \\(int64\\) holds no floating-point weights"):
        lora.read_adapter(path)


def test_unknown_metadata_key_that_is_not_json_is_kept_as_text(tmp_path):
    path = adapter_file(tmp_path / "a.safetensors")
    tensors, header = formats.read_safetensors(path, with_metadata=True)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    path.unlink()
    formats.write_safetensors(tensors, path, metadata={**header, "comment": "not { json"})
    assert lora.read_adapter(path)[0]["comment"] == "not { json"
    formats.write_safetensors(tensors, path, metadata={**header, "threshold": "0.5 or so"})
    with pytest.raises(ValueError, match="metadata threshold is not JSON"):
        lora.read_adapter(path)


def test_plain_zip_named_safetensors_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "a.safetensors"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match="is a zip archive, not an adapter"):
        lora.read_adapter(path)


def test_out_head_as_a_lora_target_is_refused_at_once():
    with pytest.raises(ValueError, match="out_head"):
        lora.parse_targets("W_query,out_head")


# ----------------------------------------------------------------------------------------------
# data.py: reading, splitting, batching, downloading, and the command line


def test_parse_splits_on_the_first_tab_only_and_keeps_quotes(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(b'ham\t"quoted start\nspam\tcall now\tor later\nham\tend "quote\nham\tlast one\n')
    assert data.load_messages(path) == [('"quoted start', 0), ("call now\tor later", 1), ('end "quote', 0),
                                        ("last one", 0)]


def test_parse_counts_replaced_invalid_utf8(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_bytes("ham\tok £5\nspam\tbad \xff\xfe byte\n".encode("utf-8").replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe"))
    messages, notes = data.read_messages(path)
    assert messages[0] == ("ok £5", 0)
    assert messages[1][0].startswith("bad \ufffd")
    assert notes == [f"note: 2 invalid UTF-8 sequence(s) in {path} were replaced by U+FFFD (the first on line 2)"]


def test_parse_accepts_the_zip_and_user_csv_files(tmp_path):
    messages = synthetic_messages(6, 6)
    sms = write_sms_file(tmp_path / "SMSSpamCollection", messages)
    with zipfile.ZipFile(tmp_path / "sms.zip", "w") as zf:
        zf.write(sms, "SMSSpamCollection")
        zf.writestr("readme", "not data")
    assert data.load_messages(tmp_path / "sms.zip") == messages
    with open(tmp_path / "mine.csv", "w", newline="") as f:  # text first, 0/1 labels, a header, a quoted comma
        w = csv_writer = csv.writer(f)
        w.writerow(["text", "label"])
        csv_writer.writerows([["Hello, friend", "0"], ["FREE cash, now!", "1"]])
    assert data.load_messages(tmp_path / "mine.csv") == [("Hello, friend", 0), ("FREE cash, now!", 1)]
    (tmp_path / "mine.tsv").write_text("label\ttext\nHAM\tsee you\nSpam\twin big\n\n")
    assert data.load_messages(tmp_path / "mine.tsv") == [("see you", 0), ("win big", 1)]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"ham\tfine\nspam no tab here\n", "line 2: no tab"),
    (b"ham\tfine\nspam\tok\nmaybe\tsomething\n", r"line 3: unknown label; found 'maybe', 'something'"),
    (b"ham\tone\nham\ttwo\n", "only ham messages"),
    (b"ham\tone\nspam\t   \n", "line 2: the message text is empty"),
])
def test_bad_data_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "sms.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.load_messages(path)


def test_missing_file_and_zip_without_the_member_are_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found; check --data"):
        data.load_messages(tmp_path / "nope.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme", "x")
    with pytest.raises(data.DataError, match="has no member SMSSpamCollection"):
        data.load_messages(tmp_path / "other.zip")


def test_split_balances_and_partitions_the_messages():
    messages = synthetic_messages(60, 20)
    splits = data.split_dataset(messages, seed=42)
    assert [len(splits[k]) for k in ("train", "val", "test", "unused")] == [28, 4, 8, 40]
    chosen = splits["train"] + splits["val"] + splits["test"]
    assert sum(label for _, label in chosen) == 20 and len(chosen) == 40  # all spam, as many ham
    assert len(set(chosen)) == 40  # disjoint (the synthetic texts are unique)
    assert sorted(chosen + splits["unused"]) == sorted(messages)
    assert all(label == 0 for _, label in splits["unused"])


def test_split_is_deterministic_for_a_seed_and_varies_with_it():
    messages = synthetic_messages(60, 20)
    assert data.split_dataset(messages, seed=1) == data.split_dataset(messages, seed=1)
    assert data.split_dataset(messages, seed=1)["train"] != data.split_dataset(messages, seed=2)["train"]


def test_split_refuses_too_few_messages():
    with pytest.raises(data.DataError, match="need at least 5 of each"):
        data.split_dataset(synthetic_messages(10, 4))


@pytest.mark.skipif(not (SHARED / "SMSSpamCollection").exists(), reason="../shared/data/SMSSpamCollection absent")
def test_real_sms_collection_counts_and_split_sizes():
    messages, notes = data.read_messages(SHARED / "SMSSpamCollection")
    assert len(messages) == 5_574 and notes == []
    assert sum(1 for _, label in messages if label == 0) == 4_827
    assert sum(label for _, label in messages) == 747
    splits = data.split_dataset(messages, seed=42)
    assert [len(splits[k]) for k in ("train", "val", "test", "unused")] == [1_045, 149, 300, 4_080]


def test_collate_pads_to_the_longest_in_the_batch(tiny_tokenizer):
    batch = [([5, 6, 7], 1), ([8], 0), ([9, 10], 1)]
    input_ids, last_index, labels = data.collate(batch, pad_id=99)
    assert input_ids.tolist() == [[5, 6, 7], [8, 99, 99], [9, 10, 99]]
    assert last_index.tolist() == [2, 0, 1] and labels.tolist() == [1, 0, 1]
    assert input_ids.dtype == last_index.dtype == torch.long
    assert data.collate(batch, pad_id=99, pad_to=6)[0].shape == (3, 6)


def test_dataset_max_length_defaults_to_longest_and_truncates_others(tiny_tokenizer):
    splits = data.split_dataset(synthetic_messages(60, 20), seed=0)
    loaders = data.make_loaders(splits, tiny_tokenizer, batch_size=4, max_length=None)
    longest = max(len(tiny_tokenizer.encode_ordinary(t)) for t, _ in splits["train"])
    assert loaders["train"].dataset.max_length == longest == loaders["test"].dataset.max_length
    short = data.SpamDataset(splits["test"], tiny_tokenizer, max_length=5)
    assert max(short.lengths()) == 5 and short.truncated == len(splits["test"])
    assert short.encoded[0] == tiny_tokenizer.encode_ordinary(splits["test"][0][0])[:5]  # keeps the start


def test_logits_at_last_index_do_not_depend_on_padding(tiny_tokenizer):
    torch.manual_seed(0)
    model = gpt2.GPTModel(tiny_cfg(context_length=64)).eval()
    short, long = tiny_tokenizer.encode_ordinary("hello"), tiny_tokenizer.encode_ordinary("a much longer message " * 2)
    with torch.no_grad():
        ids, last, _ = data.collate([(short, 0)], pad_id=tiny_tokenizer.eot_token)
        alone = model(ids)[0, last[0]]
        ids, last, _ = data.collate([(long, 1), (short, 0)], pad_id=tiny_tokenizer.eot_token)
        assert ids.shape[1] == len(long) > len(short)
        batched = model(ids)[1, last[1]]
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


def test_bucketed_batches_cover_every_message_once_with_little_padding():
    lengths = [int(x) for x in torch.randint(1, 120, (203,), generator=torch.Generator().manual_seed(3))]
    sampler = data.BucketBatchSampler(lengths, 8, torch.Generator().manual_seed(0))
    epoch1, epoch2 = list(sampler), list(sampler)
    for epoch in (epoch1, epoch2):
        assert sorted(i for b in epoch for i in b) == list(range(203)) and len(epoch) == len(sampler) == 26
    assert epoch1 != epoch2  # a new order each epoch
    assert list(data.BucketBatchSampler(lengths, 8, torch.Generator().manual_seed(0))) == epoch1  # seeded

    def pad_tokens(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches) - sum(lengths)

    in_file_order = [list(range(i, min(i + 8, 203))) for i in range(0, 203, 8)]
    assert pad_tokens(epoch1) < 0.1 * pad_tokens(in_file_order)


def test_train_loader_order_is_seeded(tiny_tokenizer):
    splits = data.split_dataset(synthetic_messages(60, 20), seed=0)
    first = [b[0].tolist() for b in data.make_loaders(splits, tiny_tokenizer, seed=5)["train"]]
    again = [b[0].tolist() for b in data.make_loaders(splits, tiny_tokenizer, seed=5)["train"]]
    other = [b[0].tolist() for b in data.make_loaders(splits, tiny_tokenizer, seed=6)["train"]]
    assert first == again and first != other


def test_download_sms_extracts_only_the_member_under_our_name(http_server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("SMSSpamCollection", "ham\thi\nspam\twin\n")
        zf.writestr("../escaped.txt", "must never be written")
    http_server.files["/sms.zip"] = buf.getvalue()
    monkeypatch.setattr(data, "SMS_URL", url_of(http_server, "/sms.zip"))
    monkeypatch.setattr(data, "SMS_SHA256", hashlib.sha256(b"ham\thi\nspam\twin\n").hexdigest())
    path = data.download_sms(cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "sms" / "SMSSpamCollection"
    assert path.read_text() == "ham\thi\nspam\twin\n"
    assert not list(tmp_path.rglob("escaped.txt"))
    assert data.download_sms(cache_dir=tmp_path / "cache") == path and len(http_server.requests) == 1


def test_downloaded_sms_data_must_match_the_published_sha256(http_server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("SMSSpamCollection", "ham\thi\nspam\twin\n")  # not the published file
    http_server.files["/sms.zip"] = buf.getvalue()
    monkeypatch.setattr(data, "SMS_URL", url_of(http_server, "/sms.zip"))
    with pytest.raises(cli.DownloadError, match="not the published file"):
        data.download_sms(cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*SMS*")) and not list((tmp_path / "cache").rglob("*.zip"))


def test_data_cli_reports_counts_lengths_and_examples(tmp_path):
    write_tiny_bpe(tmp_path / "bpe")
    sms = write_sms_file(tmp_path / "sms.txt", synthetic_messages(60, 20))
    result = run_script("data.py", "--data", sms, "--model-dir", tmp_path / "bpe")
    assert result.returncode == 0, result.stderr
    assert "80 messages (60 ham, 20 spam)" in result.stdout
    assert "  train       28 " in result.stdout and "  unused      40     40      0 " in result.stdout
    assert "Examples" in result.stdout and "tokens: [" in result.stdout


def test_data_cli_bad_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.txt").write_text("ham\tok\nwhat is this\n")
    code, err = run_main(data.main, ["--data", tmp_path / "bad.txt", "--model-dir", tmp_path], capsys)
    assert code == 2 and "line 2: no tab" in err and one_line(err)


def test_a_stray_nul_byte_is_refused_with_its_line_number(tmp_path):
    path = write_sms_file(tmp_path / "sms.tsv", synthetic_messages(8, 4))
    lines = path.read_bytes().split(b"\n")
    lines[6] = lines[6][:5] + b"\0" + lines[6][5:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(data.DataError, match=r"sms.tsv, line 7: a NUL byte"):
        data.read_messages(path)


def test_buckets_mix_classes_by_the_cheapest_swap():
    lengths = [1, 2, 3, 4, 10, 11, 12, 13]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]  # by length, each batch of four holds one class
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    data.mix_classes(batches, lengths, labels)
    # the cheapest swap brings the shortest spam (4, length 10) down: padded 4 * 10 + 4 * 13 = 92 tokens,
    # against 4 * 13 + 4 * 13 for the longest; giving away ham 0 or ham 3 costs the same, and the
    # shortest is tried first
    assert batches == [[1, 2, 3, 4], [0, 5, 6, 7]]
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 4, 1, 5]]
    data.mix_classes(batches, lengths, labels)  # a donor needs two of the other class to give one
    assert all(len({labels[i] for i in b}) == 2 for b in batches)


def test_balanced_buckets_keep_every_message_once_and_are_seeded(tiny_tokenizer):
    lengths = [random.Random(i).randint(1, 60) for i in range(200)]
    labels = [int(n > 30) for n in lengths]  # the long ones are "spam", as in the real data

    def epochs(seed):
        sampler = data.BucketBatchSampler(lengths, 8, torch.Generator().manual_seed(seed), labels=labels)
        return [list(sampler) for _ in range(2)]
    first = epochs(5)
    assert first == epochs(5) and first != epochs(6) and first[0] != first[1]
    for batches in first:
        assert sorted(i for b in batches for i in b) == list(range(200))
        single = sum(len({labels[i] for i in b}) == 1 for b in batches)
        unmixed = data.BucketBatchSampler(lengths, 8, torch.Generator().manual_seed(5))
        assert single <= 1 < sum(len({labels[i] for i in b}) == 1 for b in unmixed)


@pytest.mark.skipif(not (SHARED / "SMSSpamCollection").exists(), reason="needs ../shared/data")
def test_balanced_buckets_on_the_real_split_meet_their_targets():
    splits = data.split_dataset(data.load_messages(SHARED / "SMSSpamCollection"), seed=42)
    dataset = data.SpamDataset(splits["train"], gpt2.load_tokenizer(SHARED / "gpt2-bpe"))
    lengths, labels = dataset.lengths(), dataset.labels
    plain = list(data.BucketBatchSampler(lengths, 8, torch.Generator().manual_seed(42)))
    mixed = list(data.BucketBatchSampler(lengths, 8, torch.Generator().manual_seed(42), labels=labels))

    def single(batches):
        return sum(len({labels[i] for i in b}) == 1 for b in batches)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert len(mixed) == 131 and single(plain) > 40 and single(mixed) <= 5
    assert padded(mixed) <= 1.15 * padded(plain)


# ----------------------------------------------------------------------------------------------
# data.py: the file formats learners actually pass as --data


REAL = SHARED / "SMSSpamCollection"


# A dozen messages with the characters that trip parsers: commas, quotes (also at the start),
# £, ü, an ellipsis, a Windows right quote, and an HTML entity as in the real file.
MESSAGES = [
    ("Go until jurong point, crazy.. Available only in bugis n great world la e buffet...", 0),
    ("Ok lar... Joking wif u oni...", 0),
    ("FreeMsg: WIN a £1000 cash prize, txt WIN to 87121 now!", 1),
    ('"Hey, are you coming?" he asked', 0),
    ("I said \"ok\" and left", 0),
    ("URGENT! You have won a 1 week FREE membership in our £100,000 Prize Jackpot!", 1),
    ("Sorry, I'll call later", 0),
    ("Üll be there at 5 &lt;#&gt;", 0),
    ("Had your mobile 11 months or more? U R entitled to update to the latest colour mobiles", 1),
    ("Nah I don’t think he goes to usf, he lives around here though", 0),
    ("SIX chances to win CASH! From 100 to 20,000 pounds txt> CSH11 and send to 87575.", 1),
    ("Wait…", 0),
]


def tsv_text(messages, newline="\n"):
    return "".join(f"{data.LABELS[label]}\t{text}{newline}" for text, label in messages)


def read(path):
    messages, notes = data.read_messages(path)
    if isinstance(notes, int) and "DATA_PY_DIR" in os.environ:  # the old API's count, when comparing
        notes = [f"note: {notes} replaced"] if notes else []
    assert isinstance(notes, list) and all(isinstance(n, str) for n in notes)
    assert all(n.startswith("note: ") and "\n" not in n for n in notes), notes
    return messages, notes


def refused(path, match):
    """The DataError for path: matches match, names the file, and is one line."""
    with pytest.raises(data.DataError, match=match) as info:
        data.read_messages(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def official_zip(path, sms_bytes, member=data.SMS_MEMBER):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, sms_bytes)
        zf.writestr("readme", "SMS Spam Collection v.1\n")
    return path


# 1. UTF-8 byte-order mark ------------------------------------------------------------------------
def test_utf8_bom_is_stripped_and_the_first_message_kept(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(codecs.BOM_UTF8 + tsv_text(MESSAGES).encode())
    assert read(path) == (MESSAGES, [])


def test_utf8_bom_csv_from_excel_keeps_header_skip_and_first_row(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(codecs.BOM_UTF8 + b'label,text\r\nspam,"Win, now"\r\nham,hi\r\n')
    assert read(path)[0] == [("Win, now", 1), ("hi", 0)]
    path.write_bytes(codecs.BOM_UTF8 + b'spam,"Win, now"\r\nham,hi\r\n')  # no header: nothing lost
    assert read(path)[0] == [("Win, now", 1), ("hi", 0)]


# 2. UTF-16 / UTF-32 with a BOM ---------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_with_bom_are_decoded(tmp_path, codec):
    path = tmp_path / "sms.txt"
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
           "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}[codec]
    path.write_bytes(bom + tsv_text(MESSAGES, newline="\r\n").encode(codec))  # Notepad: CRLF too
    assert read(path) == (MESSAGES, [])


def test_damaged_utf16_is_refused_in_one_line(tmp_path):
    path = tmp_path / "sms.txt"
    path.write_bytes(codecs.BOM_UTF16_LE + tsv_text(MESSAGES).encode("utf-16-le")[:-1])  # cut short
    refused(path, "not valid UTF-16.*save it again as UTF-8")


# 3. Line endings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("newline", ["\r", "\r\n", "\n"])
def test_cr_crlf_and_lf_line_endings(tmp_path, newline):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(tsv_text(MESSAGES, newline).encode())
    assert read(path) == (MESSAGES, [])


def test_mixed_line_endings_and_cr_only_csv(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_bytes(b"ham\tone\rspam\ttwo\r\nham\tthree\nspam\tfour")  # and no final newline
    assert read(path)[0] == [("one", 0), ("two", 1), ("three", 0), ("four", 1)]
    path = tmp_path / "sms.csv"
    path.write_bytes(b'label,text\rham,"a, b"\rspam,"two\rlines"\r')  # a quoted line break stays, as \n
    assert read(path)[0] == [("a, b", 0), ("two\nlines", 1)]


# 4. Kaggle's spam.csv ------------------------------------------------------------------------------
def kaggle_rows():
    """A few dozen rows shaped like Kaggle's spam.csv (label, text, then three empty columns)."""
    rows = list(MESSAGES)
    rows += [(f"Txt {i}, to win £{i * 50}: call 0800 \"now\"", 1) for i in range(12)]
    rows += [(f"ok see u at {i}, don't be late", 0) for i in range(14)]
    return rows


def write_kaggle(path, rows, encoding="cp1252"):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # Windows CSV; quotes only where needed
    writer.writerow(["v1", "v2", "", "", ""])
    writer.writerows([data.LABELS[label], text, "", "", ""] for text, label in rows)
    path.write_bytes(out.getvalue().encode(encoding))
    return out.getvalue()


def test_kaggle_spam_csv_windows_1252(tmp_path):
    path = tmp_path / "spam.csv"
    written = write_kaggle(path, kaggle_rows())
    assert b"\xa3" in path.read_bytes() and ",,,\r\n" in written  # £ as one Latin-1 byte
    messages, notes = read(path)
    assert messages == kaggle_rows()  # nothing glued on, £ and ’ and … decoded
    assert len(notes) == 1 and "is not UTF-8" in notes[0] and "Latin-1 (Windows-1252" in notes[0]


def test_kaggle_spam_csv_latin1_bytes_cp1252_leaves_undefined(tmp_path):
    # 0x81 is undefined in Windows-1252: it must not stop the file from decoding (Latin-1 there)
    path = tmp_path / "spam.csv"
    path.write_bytes(b"v1,v2,,,\nham,caf\xe9 \x81 ok,,,\nspam,\"Win \xa3100, now\",,,\nham,\x93hi\x94,,,\n")
    assert read(path)[0] == [("café \x81 ok", 0), ("Win £100, now", 1), ("\u201chi\u201d", 0)]


def test_kaggle_spam_csv_extra_text_columns_are_joined_back(tmp_path):
    # a few Kaggle rows carry text on into the next columns; keep it, joined with the comma it lost
    path = tmp_path / "spam.csv"
    path.write_bytes(b'v1,v2,,,\nham,"Part one", part two,,\nspam,win,,,\n')
    assert read(path)[0] == [("Part one, part two", 0), ("win", 1)]


def test_legacy_file_with_an_accidentally_valid_line_is_still_windows_1252(tmp_path):
    # "\xc3\xa9" reads as UTF-8 "é", but three other lines cannot be UTF-8: the file is Latin-1
    path = tmp_path / "sms.txt"
    path.write_bytes(b"ham\tA\xc3\xa9\nspam\t\xa35\nham\tcaf\xe9\nspam\twin \xa3\n")
    messages, notes = read(path)
    assert messages == [("AÃ©", 0), ("£5", 1), ("café", 0), ("win £", 1)] and "not UTF-8" in notes[0]


def test_a_few_stray_bytes_in_a_utf8_file_are_replaced_with_a_note(tmp_path):
    path = tmp_path / "sms.tsv"
    lines = [f"ham\tok £{i} ü" for i in range(20)] + ["spam\tbad \xff byte", "spam\tand \xfe\xfe two"]
    path.write_bytes("\n".join(lines).encode().replace(b"\xc3\xbf", b"\xff").replace(b"\xc3\xbe", b"\xfe"))
    messages, notes = read(path)
    assert messages[0] == ("ok £0 ü", 0) and messages[20:] == [("bad \ufffd byte", 1), ("and \ufffd\ufffd two", 1)]
    assert notes == [f"note: 3 invalid UTF-8 sequence(s) in {path} were replaced by U+FFFD (the first on line 21)"]


def test_a_real_u_fffd_in_the_file_is_not_counted(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_bytes("ham\tok \ufffd £\nspam\tbad \udcff\n".encode("utf-8", "surrogateescape"))
    messages, notes = read(path)
    assert messages == [("ok \ufffd £", 0), ("bad \ufffd", 1)] and "note: 1 invalid" in notes[0]


# 5. A leading index column -------------------------------------------------------------------------
@pytest.mark.parametrize("sep, suffix", [(",", ".csv"), ("\t", ".tsv"), ("\t", ".txt")])
def test_leading_index_column(tmp_path, sep, suffix):
    path = tmp_path / f"mine{suffix}"
    out = io.StringIO()
    writer = csv.writer(out, delimiter=sep, lineterminator="\n") if sep == "," else None
    rows = [["", "label", "text"]] + [[str(i), data.LABELS[label], text] for i, (text, label) in enumerate(MESSAGES)]
    if writer:
        writer.writerows(rows)
    else:
        out.write("".join("\t".join(row) + "\n" for row in rows))  # pandas' sep="\t" without quoting
    path.write_text(out.getvalue(), encoding="utf-8")
    assert read(path)[0] == MESSAGES


def test_index_column_with_text_first_and_unnamed_header(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('Unnamed: 0,text,label\n0,"hello, you",0\n1,win,1\n', encoding="utf-8")
    assert read(path)[0] == [("hello, you", 0), ("win", 1)]
    path.write_text(',text,label\n7,a,ham\n9,b,spam\n12,c,ham\n', encoding="utf-8")
    assert read(path)[0] == [("a", 0), ("b", 1), ("c", 0)]


def test_index_column_without_header(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("0,ham,hello\n1,spam,win\n2,ham,bye\n", encoding="utf-8")
    assert read(path)[0] == [("hello", 0), ("win", 1), ("bye", 0)]


# 6. A folder ------------------------------------------------------------------------------------
def test_folder_without_the_file_is_refused(tmp_path):
    (tmp_path / "readme").write_text("x")
    message = refused(tmp_path, "is a folder.*pass the SMSSpamCollection file inside it")
    assert "readme" in message


def test_folder_with_the_file_reads_it_with_a_note(tmp_path):
    (tmp_path / "SMSSpamCollection").write_text(tsv_text(MESSAGES), encoding="utf-8")
    messages, notes = read(tmp_path)
    assert messages == MESSAGES and notes == [
        f"note: {tmp_path} is a folder; read the SMSSpamCollection file inside it"]


# 7. Zips under other names, and binary files --------------------------------------------------------
@pytest.mark.parametrize("name", ["SMSSpamCollection", "data.txt", "sms.csv"])
def test_zip_under_another_name_is_read_by_its_magic_bytes(tmp_path, name):
    path = official_zip(tmp_path / name, tsv_text(MESSAGES).encode())
    messages, notes = read(path)
    assert messages == MESSAGES and notes == [f"note: {path} is a zip archive; read the SMSSpamCollection inside it"]


def test_zip_of_the_unzipped_folder_is_read(tmp_path):
    path = official_zip(tmp_path / "sms.zip", tsv_text(MESSAGES).encode(), member="smsspamcollection/SMSSpamCollection")
    assert read(path) == (MESSAGES, [])


def test_zip_without_the_member_under_another_name(tmp_path):
    path = tmp_path / "data.txt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("spam.csv", "v1,v2\nham,hi\n")
    message = refused(path, "is a zip archive that has no member SMSSpamCollection")
    assert "spam.csv" in message


def test_damaged_zip_and_excel_workbook(tmp_path):
    good = official_zip(tmp_path / "good.zip", tsv_text(MESSAGES).encode()).read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[:len(good) // 2])
    refused(tmp_path / "cut.zip", "not a valid zip file.*download it again")
    (tmp_path / "cut.txt").write_bytes(good[:len(good) // 2])  # starts like a zip, under another name
    refused(tmp_path / "cut.txt", "not a valid zip file")
    with zipfile.ZipFile(tmp_path / "sms.xlsx", "w") as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("xl/workbook.xml", "<workbook/>")
    refused(tmp_path / "sms.xlsx", "Excel workbook.*save it from Excel as CSV UTF-8")


@pytest.mark.parametrize("name, content, match", [
    ("SMSSpamCollection.gz", gzip.compress(b"ham\thi\nspam\twin\n"),
     "not a text file of messages: it is gzip.*decompress"),
    ("sms.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not a text file of messages: it is a PNG image"),
    ("sms.txt", b"ham\thi\0\0\nspam\twin\n", "sms.txt, line 1: a NUL byte"),
    ("blob.txt", b"ham\tok\n" + b"\0" * 40 + b"x\n", "it holds 40 NUL bytes, the first on line 2"),
    ("sms.pdf", b"%PDF-1.4\n%\xe2\xe3\n", "not a text file of messages: it is a PDF"),
])
def test_binary_files_are_refused_in_one_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    refused(path, match)


# 8. Line separators that are not line ends --------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".csv"])
def test_unicode_line_separators_stay_inside_the_message(tmp_path, suffix):
    odd = ["a\u2028b", "c\u0085d", "e\u2029f", "g\x0bh\x0ci", "j\x1ck\x1dl\x1em"]
    messages = [(text, i % 2) for i, text in enumerate(odd)]
    path = tmp_path / f"sms{suffix}"
    sep = "," if suffix else "\t"
    path.write_bytes("".join(f"{data.LABELS[label]}{sep}{text}\n" for text, label in messages).encode())
    assert read(path) == (messages, [])


# 9. The real file, tab files, label orders and headers ---------------------------------------
@pytest.mark.skipif(not REAL.exists(), reason="../shared/data/SMSSpamCollection absent")
def test_real_file_is_split_at_its_first_tab_exactly(tmp_path):
    raw = REAL.read_bytes()
    expected = [line.decode("utf-8").split("\t", 1) for line in raw.split(b"\n")[:-1]]
    expected = [(text, data.LABEL_IDS[label]) for label, text in expected]
    messages, notes = read(REAL)
    assert messages == expected and notes == []
    assert len(messages) == 5_574 and sum(label for _, label in messages) == 747
    assert sum(label == 0 for _, label in messages) == 4_827
    assert read(official_zip(tmp_path / "sms+spam+collection.zip", raw)) == (expected, [])
    # the same file as Notepad or Excel would save it, and renamed .csv: the same messages
    text = raw.decode("utf-8")
    for name, content in [("bom", codecs.BOM_UTF8 + raw), ("crlf", text.replace("\n", "\r\n").encode()),
                          ("utf16", codecs.BOM_UTF16_LE + text.encode("utf-16-le"))]:
        (tmp_path / name).write_bytes(content)
        assert read(tmp_path / name) == (expected, []), name
    (tmp_path / "sms.csv").write_bytes(raw)  # tab-separated despite the name: never CSV-quoted
    messages, notes = read(tmp_path / "sms.csv")
    assert messages == expected and notes == [
        f"note: {tmp_path / 'sms.csv'} is tab-separated despite its name; read it as such"]


def test_tab_file_quotes_are_kept_verbatim(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_bytes(b'ham\t"quoted start\nspam\tcall now\tor later\nham\tend "quote\nham\t"a, b"\n')
    assert read(path)[0] == [('"quoted start', 0), ("call now\tor later", 1), ('end "quote', 0), ('"a, b"', 0)]


@pytest.mark.parametrize("content, suffix, expected", [
    ("label\ttext\nham\thi\nspam\twin\n", ".tsv", [("hi", 0), ("win", 1)]),
    ("text\tlabel\nhi\t0\nwin\t1\n", ".tsv", [("hi", 0), ("win", 1)]),
    ("1,\"win, now\"\n0,hi\n", ".csv", [("win, now", 1), ("hi", 0)]),
    ('text,label\n"say ""hi""",HAM\nwin,Spam\n', ".csv", [('say "hi"', 0), ("win", 1)]),
    ("hi\tham\nwin\tspam\n", "", [("hi", 0), ("win", 1)]),
])
def test_user_files_both_label_orders_and_headers(tmp_path, content, suffix, expected):
    path = tmp_path / f"mine{suffix}"
    path.write_text(content, encoding="utf-8")
    assert read(path) == (expected, [])


def test_comma_file_under_a_tab_name_is_read_as_csv_with_a_note(tmp_path):
    path = tmp_path / "spam.txt"
    write_kaggle(path, kaggle_rows(), encoding="utf-8")
    messages, notes = read(path)
    assert messages == kaggle_rows() and notes == [f"note: {path} is comma-separated despite its name; read it as such"]


def test_unclosed_csv_quote_gets_a_note(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('ham,"oops\nspam,win\nham,ok\n', encoding="utf-8")
    with pytest.raises(data.DataError, match="only ham"):  # the quote swallowed the spam line
        data.read_messages(path)
    path.write_text('ham,"oops\nspam,win\nham,ok"\nspam,fine\n', encoding="utf-8")
    messages, notes = read(path)
    assert messages[0] == ("oops\nspam,win\nham,ok", 0) and "span several lines, the first on line 1" in notes[0]


# 10. Refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b" \n\t\r\n  \r", "is empty"),
    (codecs.BOM_UTF16_LE + " \n".encode("utf-16-le"), "is empty"),
    (b"label\ttext\n", "holds no messages"),
    (b"ham\tone\nham\ttwo\n", "only ham messages.*both ham and spam"),
    (b"spam\tone\r\nspam\ttwo\r\n", "only spam messages"),
    (b"ham\tfine\nspam\tok\nmaybe\tsomething\n",
     r"line 3: unknown label; found 'maybe', 'something', expected ham/spam or 0/1"),
    (b"ham\tone\nspam\t   \n", "line 2: the message text is empty"),
    (b"ham\tone\nspam\t\n", "line 2: the message text is empty"),
    (b"ham\tfine\nspam no tab here\n", "line 2: no tab between the label and the text"),
    (b"ham\tfine\rspam\tok\rmaybe\tsomething\r", "line 3: unknown label"),  # CR-only: line numbers right
])
def test_bad_files_are_one_clear_line(tmp_path, content, match):
    path = tmp_path / "sms.txt"
    path.write_bytes(content)
    refused(path, match)


def test_bad_csv_rows_name_their_line(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(b'label,text\nham,"two\nlines"\nspam,\nham,ok\n')
    refused(path, "line 4: the message text is empty")
    path.write_bytes(b"ham,hi\nspam,win\nmaybe,what\n")
    refused(path, "line 3: unknown label")
    path.write_bytes(b"ham,hi\nspam,win\nnothing here\n")
    refused(path, "line 3: no comma between the label and the text")


def test_missing_file_is_one_line(tmp_path):
    refused(tmp_path / "nope.txt", "not found; check --data")


# The command line prints the notes on stderr -----------------------------------------------------
@pytest.mark.skipif(not (SHARED / "gpt2-bpe" / "encoder.json").exists(), reason="shared gpt2-bpe absent")
def test_data_cli_prints_notes_on_stderr(tmp_path, capsys):
    path = tmp_path / "spam.csv"
    # more ham than spam: with equal classes the "unused" split is empty and main() cannot print it
    rows = [(f"win £{i}, now", 1) for i in range(10)] + [(f"see u at {i}", 0) for i in range(12)]
    write_kaggle(path, rows, encoding="latin-1")
    data.main(["--data", str(path), "--model-dir", str(SHARED / "gpt2-bpe")])
    out, err = capsys.readouterr()
    assert "22 messages (12 ham, 10 spam)" in out and "note:" not in out
    assert err.startswith(f"note: {path} is not UTF-8") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# train.py: training, its report, and the files it writes (curves, best epoch, threshold)


def test_train_prints_the_report_in_order(trained):
    out = trained[0].stdout
    cfg = tiny_cfg()
    n_lora = lora_count(cfg, 4)
    steps = ["Model before LoRA", "(W_query): Linear(", "Model after LoRA", "(W_query): LinearWithLoRA(",
             f"trainable params: {n_lora:,} || all params: {hand_count(cfg) + n_lora:,} || trainable%: ",
             f"trainable params: {n_lora + 34:,} || all params: {hand_count(cfg) + n_lora + 34:,}",
             "Epoch 1 | Batch 0/", "Epoch 1 | Batch 2/", "Epoch 1 Finished | Avg Loss: ",
             "Epoch 3 Finished", "Test Set Accuracy: ", "Spam precision: ", "Confusion matrix",
             "False positives on the 40 unused ham messages: "]
    positions = [out.find(s) for s in steps]
    assert all(p >= 0 for p in positions), [s for s, p in zip(steps, positions) if p < 0]
    assert positions == sorted(positions)
    assert re.search(r"Epoch 2 Finished \| Avg Loss: \d\.\d{4} \| Acc: \d+\.\d\d% \| Val Acc: \d+\.\d\d% \| "
                     r"Time: \d+\.\d\ds\n", out)
    # the synthetic task is easy: a broken training loop would not reach this
    assert "Test Set Accuracy: 100.00%" in out


def test_train_writes_adapter_and_metrics(trained):
    _, adapter = trained
    meta, tensors = lora.read_adapter(adapter)
    assert meta["rank"] == 4 and meta["labels"] == ["ham", "spam"] and meta["targets"] == "all"
    assert meta["max_length"] > 0 and meta["config"]["emb_dim"] == 16
    metrics = json.loads(adapter.with_name("a.pt.metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["test"]["accuracy"] == 1.0 and metrics["unused"]["messages"] == 40
    assert not list(adapter.parent.glob("*.tmp"))


def test_train_is_reproducible_for_a_seed(workdir, tmp_path):
    runs = []
    for name in ("x.pt", "y.pt"):
        result = run_script(HERE / "train.py", "--model-dir", workdir / "model", "--data", workdir / "sms.txt",
                            "--epochs", "1", "--rank", "2", "--precision", "fp32", "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
        runs.append(json.loads((tmp_path / f"{name}.metrics.json").read_text()))
    for run in runs:
        for h in run["history"]:
            h.pop("seconds")
        run.pop("args"), run.pop("run_id")  # a fresh random id ties each run's adapter to its metrics
    assert runs[0] == runs[1]
    _, a = lora.read_adapter(tmp_path / "x.pt")
    _, b = lora.read_adapter(tmp_path / "y.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_trains_exactly_the_same(workdir, tmp_path):
    """bf16 with LoRA dropout: the recomputed forward must draw the same dropout masks."""
    runs = []
    for name, flag in (("plain", []), ("recomputed", ["--gradient-checkpointing"])):
        result = run_script(HERE / "train.py", "--model-dir", workdir / "model", "--data", workdir / "sms.txt",
                            *TRAIN_ARGS[:-1], "bf16", "--lora-dropout", "0.2", *flag, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
        runs.append(json.loads((tmp_path / f"{name}.metrics.json").read_text()))
    assert runs[1]["args"]["gradient_checkpointing"] and not runs[0]["args"]["gradient_checkpointing"]
    for run in runs:
        for h in run["history"]:
            h.pop("seconds")
        run.pop("args"), run.pop("run_id")
    assert runs[0] == runs[1]


def test_train_turns_gradient_checkpointing_on_only_when_asked(workdir, tmp_path, capsys):
    for flag in ([], ["--gradient-checkpointing"]):
        args = train.parse_args(["--model-dir", str(workdir / "model"), "--data", str(workdir / "sms.txt"),
                                 "--precision", "fp32", "--out", str(tmp_path / "a.safetensors"), *flag])
        model = train.build(args, torch.device("cpu"))[0]
        assert model.gradient_checkpointing is bool(flag)


def test_curves_svg_holds_the_metrics_points(trained):
    _, adapter = trained
    metrics = json.loads(adapter.with_name("a.pt.metrics.json").read_text())
    svg = ET.parse(adapter.with_name("a.pt.curves.svg")).getroot()
    series = {el.get("id"): el for el in svg.iter("{http://www.w3.org/2000/svg}polyline")}
    assert set(series) == {"train-loss", "val-loss", "train-acc", "val-acc"}
    history = metrics["history"]
    assert json.loads(series["val-acc"].get("data-values")) == [[h["epoch"], 100 * h["val_accuracy"]] for h in history]
    assert json.loads(series["val-loss"].get("data-values")) == [[h["epoch"], h["val_loss"]] for h in history]
    assert json.loads(series["train-acc"].get("data-values")) == [[h["epoch"], 100 * h["train_accuracy"]]
                                                                  for h in history]
    train_loss = json.loads(series["train-loss"].get("data-values"))
    assert len(train_loss) == 3 * 2  # 4 batches an epoch, logged every 2: batches 0 and 2, three epochs
    assert [round(x, 6) for x, _ in train_loss[:2]] == [0.25, 0.75]  # batch 0 and 2 of 4, in epochs
    for el in series.values():  # one pixel point per value, larger values higher up (smaller y)
        values = json.loads(el.get("data-values"))
        pixels = [tuple(map(float, p.split(","))) for p in el.get("points").split()]
        assert len(pixels) == len(values)
        for (_, a), (_, b), (_, ya), (_, yb) in zip(values, values[1:], pixels, pixels[1:]):
            assert (a > b) == (ya < yb) or a == b
    labels = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert {"epoch", "loss", "accuracy (%)", "validation accuracy", "training loss (per logged batch)"} <= labels


def test_progress_lines_show_batch_count_and_no_time_left_from_too_few_batches(trained):
    out = trained[0].stdout
    assert re.search(r"^Epoch 1 \| Batch 0/4 \| Loss: \d\.\d{4}$", out, re.M)
    assert re.search(r"^Epoch 1 \| Batch 2/4 \| Loss: \d\.\d{4}$", out, re.M)  # 3 batches: too few for a pace


def test_time_left_appears_once_a_few_batches_and_seconds_have_passed(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])
    clock = (100.0, 0, 50, 0)  # started at t = 100 s, no batch done before, 50 in the run, first epoch
    now[0] = 160.0
    assert train.eta(clock, 4) == ""  # a minute, but only 4 batches: the pace of so few says little
    now[0] = 101.0
    assert train.eta(clock, 10) == ""  # 10 batches, but in one second
    now[0] = 130.0
    assert train.eta(clock, 10) == " | 2:00 left"  # 3 s a batch, 40 batches left
    resumed = (130.0, 20, 50, 20)  # a resumed run: its pace counts only the batches it ran itself
    now[0] = 145.0
    assert train.eta(resumed, 5) == " | 1:15 left"  # 3 s a batch, 25 left


class _ScriptedVal:
    """Stands in for train.spam_probabilities on the val split: returns the scripted losses in turn."""

    def __init__(self, losses):
        self.losses, self.calls = list(losses), 0

    def __call__(self, model, loader, device, precision="fp32", name=None):
        loss = self.losses[min(self.calls, len(self.losses) - 1)]
        self.calls += 1
        return [0, 1], [0.2, 0.8], loss


@pytest.mark.parametrize("keep, val_losses, kept_epoch", [("best", [0.5, 0.1, 0.3], 2), ("last", [0.5, 0.1, 0.3], 3)])
def test_the_kept_adapter_is_that_of_the_chosen_epoch(tiny_tokenizer, monkeypatch, keep, val_losses, kept_epoch):
    model = tiny_classifier()
    splits = data.split_dataset(synthetic_messages(30, 10), seed=1)
    loaders = data.make_loaders(splits, tiny_tokenizer, batch_size=4, seed=1, context_length=32)
    snapshots, real_epoch = [], train.train_epoch

    def epoch_and_snapshot(*args, **kwargs):
        result = real_epoch(*args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in lora.adapter_state(model).items()})
        return result
    monkeypatch.setattr(train, "train_epoch", epoch_and_snapshot)
    monkeypatch.setattr(train, "spam_probabilities", _ScriptedVal(val_losses))
    args = argparse.Namespace(epochs=3, lr=1e-2, weight_decay=0.0, log_every=100, threshold=0.5, keep=keep,
                              grad_accum=1, max_grad_norm=None, lr_schedule="constant", warmup_steps=0, patience=None)
    history, _, kept = train.fit(model, loaders, args, torch.device("cpu"), "fp32")
    assert kept == kept_epoch and [h.get("kept", False) for h in history] == [e == kept_epoch for e in (1, 2, 3)]
    state = lora.adapter_state(model)
    assert all(torch.equal(state[k], snapshots[kept_epoch - 1][k]) for k in state)
    assert not all(torch.equal(snapshots[0][k], snapshots[2][k]) for k in state)  # the epochs did differ


def test_roc_auc_equals_counting_every_pair():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60).tolist()
    probs = np.round(rng.random(60), 1).tolist()  # rounded: many ties
    spam = [p for p, y in zip(probs, labels) if y]
    ham = [p for p, y in zip(probs, labels) if not y]
    pairs = sum((s > h) + 0.5 * (s == h) for s in spam for h in ham) / (len(spam) * len(ham))
    assert train.roc_auc(labels, probs) == pytest.approx(pairs, abs=1e-12)
    assert train.roc_auc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0 and train.roc_auc([1, 1], [0.5, 0.6]) is None


def test_threshold_is_stored_reported_and_overridden(workdir, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    train.main(["--model-dir", str(workdir / "model"), "--data", str(workdir / "sms.txt"), "--epochs", "1",
                "--rank", "2", "--threshold", "0.3", "--precision", "fp32", "--out", str(out)])
    report = capsys.readouterr().out
    assert re.search(r"Validation: ROC AUC \d\.\d{4}", report)
    assert re.search(r"^\s+0\.30\s+\d\.\d{4}\s+\d\.\d{4}\s+<- --threshold$", report, re.M)
    assert lora.read_adapter(out)[0]["threshold"] == 0.3
    predict.main(["--adapter", str(out), "--json", "--precision", "fp32", "hello there"])
    row = json.loads(capsys.readouterr().out)
    assert row["threshold"] == 0.3 and row["label"] == ("spam" if row["spam_probability"] >= 0.3 else "ham")
    for threshold, label in (("0", "spam"), ("1", "ham")):
        predict.main(["--adapter", str(out), "--json", "--precision", "fp32", "--threshold", threshold, "hello there"])
        row = json.loads(capsys.readouterr().out)
        assert row["label"] == label and row["threshold"] == float(threshold)


def test_bf16_training_reaches_the_fp32_accuracy(workdir, tmp_path):
    result = run_script(HERE / "train.py", "--model-dir", workdir / "model", "--data", workdir / "sms.txt",
                        *TRAIN_ARGS[:-1], "bf16", "--out", tmp_path / "b.safetensors")
    assert result.returncode == 0, result.stderr
    assert "precision: bf16 (as asked)" in result.stdout
    metrics = json.loads((tmp_path / "b.safetensors.metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["test"]["accuracy"] >= 0.95
    assert lora.read_adapter(tmp_path / "b.safetensors")[0]["precision"] == "bf16"


# ----------------------------------------------------------------------------------------------
# train.py: bad arguments, failures while training, and Ctrl-C


def test_gradient_checkpointing_with_lora_dropout_is_refused_on_mps():
    args = train.parse_args(["--gradient-checkpointing", "--lora-dropout", "0.1"])
    with pytest.raises(ValueError, match="does not work on mps"):
        train.check_device(args, torch.device("mps"))
    train.check_device(args, torch.device("cpu"))  # the CPU replays its random state: allowed
    train.check_device(train.parse_args(["--gradient-checkpointing"]), torch.device("mps"))  # no dropout: allowed


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "rank must be an integer >= 1"),
    (["--alpha", "-2"], "alpha must be a number > 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--targets", "W_qery"], "W_qery matches no"),
    (["--out", "/nonexistent/dir/a.pt"], "does not exist"),
    (["--data", "/nonexistent.txt"], "not found; check --data"),
    (["--model", "huge"], "unknown GPT-2 size 'huge'"),
])
def test_train_bad_input_is_one_line_and_exit_2(workdir, tmp_path, args, message, capsys):
    base = ["--model-dir", workdir / "model", "--data", workdir / "sms.txt", "--out", tmp_path / "a.pt"]
    code, err = run_main(train.main, base + args, capsys)
    assert code == 2 and message in err and one_line(err)
    assert not (tmp_path / "a.pt").exists()


def test_ctrl_c_stops_training_cleanly_and_keeps_the_old_adapter(workdir, tmp_path):
    out = tmp_path / "a.safetensors"
    lora.save_adapter(tiny_classifier(), out, ADAPTER_META)  # an earlier run's
    earlier = out.read_bytes()
    proc = subprocess.Popen([sys.executable, str(HERE / "train.py"), "--model-dir", str(workdir / "model"),
                             "--data", str(workdir / "sms.txt"), "--epochs", "100000", "--precision", "fp32",
                             "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Epoch 2 |"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted; the adapter was not saved" in err and "--resume continues it" in err, err
    assert "Traceback" not in err and one_line(err)
    assert out.read_bytes() == earlier and not list(tmp_path.glob(".*.tmp"))


def base_train_args(hostile, out):
    return ["--model-dir", hostile / "model", "--data", hostile / "sms.txt", "--epochs", "1", "--rank", "2",
            "--precision", "fp32", "--out", out]


MISSING_MODEL = "/nonexistent/model-folder"  # would be a different error if the model were loaded first


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "is a folder"),
    ("/dev/null", "is a folder or a device"),
    ("/sys/hostile.safetensors", "cannot write"),
    ("/proc/hostile.safetensors", "cannot write"),
    ("{tmp}/no/such/folder/a.safetensors", "does not exist"),
])
def test_train_unusable_out_is_refused_before_loading_the_model(tmp_path, capsys, out, message):
    out = out.format(tmp=tmp_path)
    if not Path(out).parent.is_dir() and "no/such" not in out:
        pytest.skip(f"{Path(out).parent} absent here")
    code, err = run_main(train.main, ["--model-dir", MISSING_MODEL, "--data", "/nonexistent.txt",
                                      "--precision", "fp32", "--out", out], capsys)
    assert code == 2 and one_line(err) and "--out" in err and message in err


def test_out_needs_room_for_the_adapter_it_will_write(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    args = argparse.Namespace(out=str(tmp_path / "a.safetensors"), data=None, model_dir=str(tmp_path / "model"))
    train.check_out(args, need=free // 2)
    with pytest.raises(ValueError, match=f"less than {(free + 2**30) / 1e6:,.0f} MB free"):
        train.check_out(args, need=free + 2**30)  # e.g. GPT-2 XL's adapter on a full disk
    assert not list(tmp_path.iterdir())  # the probe file is gone


def test_train_out_in_a_read_only_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes (see the /sys case)")
        code, err = run_main(train.main, ["--model-dir", MISSING_MODEL, "--precision", "fp32",
                                          "--out", folder / "a.safetensors"], capsys)
        assert code == 2 and one_line(err) and "cannot write" in err
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("args", [
    ["--lr", "inf"], ["--lr", "nan"], ["--lr", "1e30"], ["--lr", "-inf"], ["--lr", "0"],
    ["--weight-decay", "inf"], ["--weight-decay", "nan"], ["--weight-decay", "-1"],
    ["--alpha", "inf"], ["--alpha", "nan"], ["--alpha", "-inf"], ["--alpha", "1e300"],
    ["--lora-dropout", "nan"], ["--lora-dropout", "1"], ["--threshold", "nan"], ["--threshold", "2"],
    ["--seed", str(2**64)], ["--seed", "-1"], ["--rank", str(10**12)], ["--max-length", "0"],
    ["--batch-size", "0"], ["--epochs", "-1"], ["--log-every", "0"],
])
def test_train_bad_number_is_one_line_and_exit_2(hostile, tmp_path, capsys, args):
    """A real model and data: without the check, training would run (and write out, or fail otherwise)."""
    out = tmp_path / "a.safetensors"
    code, err = run_main(train.main, [*base_train_args(hostile, out), *args], capsys)
    assert code == 2 and one_line(err), err
    assert args[0] in err or args[0][2:].replace("-", " ") in err.lower(), err  # the flag's own check said it
    assert not out.exists()


@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:3", "bogus", "cpu:x"])
def test_train_unusable_device_lists_the_available_ones(hostile, tmp_path, capsys, device):
    if device in cli.available_devices() or (device == "cuda" and torch.cuda.is_available()):
        pytest.skip(f"{device} is usable here")
    code, err = run_main(train.main, [*base_train_args(hostile, tmp_path / "a.safetensors"), "--device", device],
                         capsys)
    assert code == 2 and one_line(err) and "available: auto, cpu" in err
    assert not (tmp_path / "a.safetensors").exists()


def test_train_loss_turning_non_finite_stops_with_one_line_and_writes_nothing(hostile, tmp_path, capsys):
    tensors = random_tensors(tiny_cfg())
    tensors["ln_f/g"][0] = np.nan  # a damaged base model: every logit becomes NaN
    gpt2.write_model_folder(tmp_path / "model", tiny_cfg(), tensors)
    write_tiny_bpe(tmp_path / "model")
    out = tmp_path / "out" / "a.safetensors"
    out.parent.mkdir()
    args = base_train_args(hostile, out)
    args[1] = tmp_path / "model"
    code, err = run_main(train.main, args, capsys)
    assert code == 2 and one_line(err) and "loss became nan" in err
    assert list(out.parent.iterdir()) == []  # no adapter, metrics, curves or temporary file


def test_train_eval_unused_on_a_balanced_file_is_one_line(hostile, tmp_path, capsys):
    sms = write_sms_file(tmp_path / "balanced.txt", synthetic_messages(20, 20))
    args = base_train_args(hostile, tmp_path / "a.safetensors")
    args[3] = sms
    code, err = run_main(train.main, [*args, "--eval-unused"], capsys)
    assert code == 2 and one_line(err) and "--eval-unused" in err
    assert not (tmp_path / "a.safetensors").exists()


def train_args(workdir, out, *extra):
    return [HERE / "train.py", "--model-dir", workdir / "model", "--data", workdir / "sms.txt",
            "--epochs", "3", "--rank", "2", "--precision", "fp32", "--out", out, *extra]


@pytest.mark.parametrize("out, message", [
    ("sms.txt", "would overwrite the training data"),
    ("model/adapter.safetensors", "would write into the model folder"),
    ("model/hparams.json", "would write into the model folder"),
    ("notes.txt", "is an existing file that is not an adapter made by train.py"),
    ("", "--out is empty"),
])
def test_train_refuses_an_out_that_would_destroy_an_input(workdir, out, message, capsys):
    (workdir / "notes.txt").write_text("my notes\n")
    before = {p: p.read_bytes() for p in [workdir / "sms.txt", *(workdir / "model").iterdir()]}
    code, err = run_main(train.main, train_args(workdir, workdir / out if out else "")[1:], capsys)
    assert code == 2 and one_line(err) and message in err, err
    assert before == {p: p.read_bytes() for p in before} and (workdir / "notes.txt").read_text() == "my notes\n"


def killed_after_epoch_1(command_args) -> int:
    """Run train.py and SIGKILL it as soon as it has saved the checkpoint of epoch 1; its exit code."""
    with subprocess.Popen([sys.executable, *map(str, command_args)], stdout=subprocess.PIPE, text=True,
                          cwd=HERE) as run:
        for line in run.stdout:
            if line.startswith("Saved a checkpoint of epoch 1 "):
                run.kill()  # SIGKILL: no handler runs, nothing is tidied up
                break
    return run.returncode


def test_train_resumed_after_sigkill_ends_with_the_same_adapter_bit_for_bit(workdir, tmp_path, capsys):
    args = ["--epochs", "4", "--lora-dropout", "0.2", "--keep", "last"]  # dropout: the random state matters too
    reference = run_script(*train_args(workdir, tmp_path / "ref.safetensors", *args))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "a.safetensors"
    code = killed_after_epoch_1(train_args(workdir, out, *args))
    assert code == -signal.SIGKILL and not out.exists()
    assert tmp_path.joinpath("a.safetensors.checkpoint").exists()
    code, err = run_main(train.main, train_args(workdir, out, *args)[1:], capsys)  # without --resume: refused
    assert code == 2 and "--resume" in err and tmp_path.joinpath("a.safetensors.checkpoint").exists()
    resumed = run_script(*train_args(workdir, out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed a stopped run after its epoch" in resumed.stdout and "Epoch 4 Finished" in resumed.stdout
    want, got = formats.read_safetensors(tmp_path / "ref.safetensors"), formats.read_safetensors(out)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    histories = [json.loads(p.read_text())["history"] for p in (tmp_path / "ref.safetensors.metrics.json",
                                                               tmp_path / "a.safetensors.metrics.json")]
    for history in histories:
        for epoch in history:
            epoch.pop("seconds")
    assert histories[0] == histories[1] and len(histories[0]) == 4
    assert not tmp_path.joinpath("a.safetensors.checkpoint").exists()  # removed once the adapter is saved


def test_resume_with_other_arguments_is_refused_naming_the_difference(workdir, tmp_path):
    out, checkpoint = tmp_path / "a.safetensors", tmp_path / "a.safetensors.checkpoint"
    # a checkpoint of epoch 1, as a stopped 3-epoch run leaves it: train 1 epoch of 3 and stop it there
    assert killed_after_epoch_1(train_args(workdir, out)) == -signal.SIGKILL
    result = run_script(*train_args(workdir, out, "--resume", "--lr", "0.01"))
    assert result.returncode == 2 and one_line(result.stderr), result.stderr
    assert "lr 0.0008 in the checkpoint, 0.01 now" in result.stderr
    assert checkpoint.exists()


def test_existing_sidecar_files_that_train_did_not_write_are_refused(workdir, tmp_path, capsys):
    notes = tmp_path / "a.safetensors.metrics.json"
    notes.write_text("my notes\n")
    code, err = run_main(train.main, train_args(workdir, tmp_path / "a.safetensors")[1:], capsys)
    assert code == 2 and one_line(err) and "a.safetensors.metrics.json exists and was not written by train.py" in err
    assert notes.read_text() == "my notes\n"


def test_a_second_run_never_writes_over_the_checkpoint_of_another(tiny_tokenizer, tmp_path):
    model = tiny_classifier()
    splits = data.split_dataset(synthetic_messages(30, 10), seed=1)
    loader = data.make_loaders(splits, tiny_tokenizer, batch_size=4, seed=1, context_length=32)["train"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    args = argparse.Namespace(out=str(tmp_path / "a.safetensors"))
    progress, kept = {"epoch": 1, "history": [], "curve": [], "best": 0.5}, lora.adapter_state(model)
    train.write_checkpoint(args, {"run": "first"}, model, optimizer, loader, progress, kept)
    written = (tmp_path / "a.safetensors.checkpoint").read_bytes()
    with pytest.raises(ValueError, match="another train.py run is writing its checkpoint"):
        train.write_checkpoint(args, {"run": "second"}, model, optimizer, loader, progress, kept)
    assert (tmp_path / "a.safetensors.checkpoint").read_bytes() == written
    train.write_checkpoint(args, {"run": "first"}, model, optimizer, loader, progress, kept)  # its own: fine


def test_a_damaged_checkpoint_is_refused_not_resumed(workdir, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    assert killed_after_epoch_1(train_args(workdir, out)) == -signal.SIGKILL
    checkpoint = tmp_path / "a.safetensors.checkpoint"
    raw = bytearray(checkpoint.read_bytes())
    raw[-3] ^= 0x40  # one bit of one tensor's last bytes
    checkpoint.write_bytes(bytes(raw))
    code, err = run_main(train.main, train_args(workdir, out, "--resume")[1:], capsys)
    assert code == 2 and one_line(err) and "sha256 differs" in err and not out.exists()


@pytest.mark.parametrize("script", ["train.py", "predict.py"])
def test_help_into_a_full_disk_is_not_a_silent_success(script):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(HERE / script), "--help"], stdout=full, stderr=subprocess.PIPE,
                                text=True, cwd=HERE, timeout=300)
    assert result.returncode == 2 and one_line(result.stderr) and "no space left" in result.stderr.lower()


def test_train_with_a_closed_stdout_still_trains_and_saves(workdir, tmp_path):
    out = tmp_path / "a.safetensors"
    command = [sys.executable, *map(str, train_args(workdir, out, "--epochs", "1"))]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE) as run:
        run.stdout.close()  # as `train.py | head -1` does once head has its line
        err = run.stderr.read().decode()
    assert run.returncode == 0 and out.exists(), err
    assert "standard output failed" in err and "an adapter it trained is saved" in err and "Traceback" not in err


@pytest.mark.parametrize("script", ["train.py", "predict.py", "data.py"])
def test_a_full_stdout_ends_in_one_line_and_exit_2(trained, workdir, tmp_path, script):
    args = {"train.py": train_args(workdir, tmp_path / "a.safetensors", "--epochs", "1")[1:],
            "predict.py": ["--adapter", trained[1], "--precision", "fp32", "hello"],
            "data.py": ["--data", workdir / "sms.txt", "--model-dir", workdir / "model"]}[script]
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], stdout=full,
                                stderr=subprocess.PIPE, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 2 and one_line(result.stderr), result.stderr
    assert "no space left" in result.stderr.lower()
    if script == "train.py":
        assert (tmp_path / "a.safetensors").exists()  # the run itself was not lost


def eight_messages(tokenizer):
    """(token ids, label) of four ham and four spam messages, short enough for tiny_cfg's context."""
    messages = [(f"hi {i} lunch", 0) for i in range(4)] + [(f"WIN {i} prize now", 1) for i in range(4)]
    return [(tokenizer.encode_ordinary(text), label) for text, label in messages]


def test_grad_accum_of_two_batches_of_4_is_the_update_of_one_batch_of_8(tiny_tokenizer):
    rows = eight_messages(tiny_tokenizer)
    eot = tiny_tokenizer.eot_token
    models = [tiny_classifier(seed=3), tiny_classifier(seed=3)]
    for model in models:
        model.train()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    train.train_step(models[0], optimizers[0], [data.collate(rows, eot)])
    train.train_step(models[1], optimizers[1], [data.collate(rows[:4], eot), data.collate(rows[4:], eot)])
    a, b = lora.adapter_state(models[0]), lora.adapter_state(models[1])
    assert not all(torch.equal(a[k], tiny_classifier(seed=3).state_dict()[k]) for k in a)  # a step was taken
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_max_grad_norm_clips_the_whole_gradient(tiny_tokenizer):
    model = tiny_classifier(seed=1)
    before = {k: v.detach().clone() for k, v in lora.adapter_state(model).items()}
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)  # update = -gradient
    train.train_step(model, sgd, [data.collate(eight_messages(tiny_tokenizer), tiny_tokenizer.eot_token)],
                     max_grad_norm=1e-3)
    after = lora.adapter_state(model)
    step = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    assert abs(step.item() - 1e-3) < 1e-8  # the gradient was far larger than 1e-3, and is now exactly that


@pytest.mark.parametrize("schedule, want", [
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [1 / 3, 2 / 3, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_lr_schedule_warms_up_then_follows_its_shape(schedule, want):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    args = argparse.Namespace(lr_schedule=schedule, warmup_steps=2)
    scheduler = train.lr_scheduler(optimizer, args, steps=6)
    got = []
    for _ in range(6):
        got.append(optimizer.param_groups[0]["lr"] / 0.1)
        optimizer.step()
        scheduler.step()
    assert got == pytest.approx(want, abs=1e-12)
    resumed = torch.optim.SGD([param], lr=0.1)  # --resume after 4 steps: the rate where the run was
    train.lr_scheduler(resumed, args, steps=6, done=4)
    assert resumed.param_groups[0]["lr"] / 0.1 == pytest.approx(want[4], abs=1e-12)
    assert train.lr_scheduler(optimizer, argparse.Namespace(lr_schedule="constant", warmup_steps=0), 6) is None


def test_patience_stops_training_and_keeps_the_best_epoch(tiny_tokenizer, monkeypatch, capsys):
    model = tiny_classifier()
    splits = data.split_dataset(synthetic_messages(30, 10), seed=1)
    loaders = data.make_loaders(splits, tiny_tokenizer, batch_size=4, seed=1, context_length=32)
    monkeypatch.setattr(train, "spam_probabilities", _ScriptedVal([0.5, 0.4, 0.45, 0.41, 0.3, 0.2]))
    args = argparse.Namespace(epochs=6, lr=1e-2, weight_decay=0.0, log_every=100, threshold=0.5, keep="best",
                              grad_accum=1, max_grad_norm=None, lr_schedule="constant", warmup_steps=0, patience=2)
    history, _, kept = train.fit(model, loaders, args, torch.device("cpu"), "fp32")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and kept == 2  # epochs 3 and 4 did not beat 0.4
    assert "Stopped early" in capsys.readouterr().out


def test_train_reports_the_test_sets_roc_auc(trained):
    result, adapter = trained
    metrics = json.loads(adapter.with_name(adapter.name + ".metrics.json").read_text())
    assert metrics["test"]["roc_auc"] == 1.0  # every test spam message scores above every test ham one
    assert "Test ROC AUC: 1.0000" in result.stdout


def test_train_offline_names_every_missing_input_in_one_line(tmp_path, monkeypatch, capsys):
    port = closed_port()
    monkeypatch.setattr(gpt2, "OPENAI_URL", f"http://127.0.0.1:{port}/{{size}}/{{file}}")
    monkeypatch.setattr(data, "SMS_URL", f"http://127.0.0.1:{port}/sms.zip")
    code, err = run_main(train.main, ["--cache-dir", tmp_path / "cache", "--precision", "fp32",
                                      "--out", tmp_path / "a.safetensors"], capsys)
    assert code == 2 and one_line(err), err
    assert "--data PATH" in err and "--model-dir" in err  # both, in one run
    assert not (tmp_path / "cache").exists()  # no empty folders left in the cache


# ----------------------------------------------------------------------------------------------
# predict.py: messages, stdin, "--", thresholds, JSON, and bad adapters


def test_predict_prints_text_label_and_confidence(trained):
    _, adapter = trained
    spam, ham = synthetic_messages(60, 20)[67][0], synthetic_messages(60, 20)[7][0]  # messages of the data file
    result = run_script("predict.py", "--precision", "fp32", "--adapter", adapter, spam, ham)
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("-" * 30 + "\n")
    assert re.fullmatch(re.escape(f"Text: {spam!r}\nPrediction: SPAM (Confidence: ") + r"\d\.\d\d\)\n", blocks[0])
    assert re.fullmatch(re.escape(f"Text: {ham!r}\nPrediction: HAM (Normal) (Confidence: ") + r"\d\.\d\d\)\n",
                        blocks[1])


def test_predict_json_and_stdin_with_invalid_utf8(trained):
    _, adapter = trained
    result = subprocess.run([sys.executable, "predict.py", "--precision", "fp32", "--adapter", str(adapter), "--json",
                             "-"],
                            input=b"WIN a FREE prize now call 0900\nhey \xff lunch ok\n", capture_output=True,
                            cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["label"] for r in rows] == ["spam", "ham"]
    assert rows[1]["text"] == "hey \ufffd lunch ok" and 0 <= rows[1]["spam_probability"] < 0.5


def test_predict_matches_the_unmerged_trained_model(trained, workdir):
    """The merged CLI model must give the probabilities the trained (unmerged) model gives."""
    _, adapter = trained
    meta, _ = lora.read_adapter(adapter)
    model = gpt2.load_gpt2(workdir / "model")
    lora.replace_linear_with_lora(model, meta["rank"], meta["alpha"])
    model.out_head = torch.nn.Linear(16, 2)
    lora.load_adapter(model, adapter)
    tok = gpt2.load_tokenizer(workdir / "model")
    text = "WIN a FREE prize 3 now"
    with torch.no_grad():
        want = torch.softmax(model(torch.tensor([tok.encode_ordinary(text)]))[0, -1], -1)[1].item()
    result = run_script("predict.py", "--precision", "fp32", "--adapter", adapter, "--json", text)
    assert abs(json.loads(result.stdout)["spam_probability"] - want) < 1e-5


def test_predict_rebuilds_an_adapter_with_other_targets_rank_and_alpha(workdir, tmp_path, capsys):
    out = tmp_path / "qv.pt"
    train.main(["--model-dir", str(workdir / "model"), "--data", str(workdir / "sms.txt"), "--epochs", "1",
                "--rank", "3", "--alpha", "5", "--targets", "W_query,W_value", "--precision", "fp32",
                "--out", str(out)])
    assert "trainable params: " + f"{3 * 2 * 2 * 32:,}" in capsys.readouterr().out  # 2 layers x 2 targets x r(16+16)
    meta, tensors = lora.read_adapter(out)
    assert meta["targets"] == ["W_query", "W_value"] and meta["rank"] == 3 and meta["alpha"] == 5
    assert len([n for n in tensors if n.endswith(".lora.A")]) == 4
    predict.main(["--adapter", str(out), "--json", "--precision", "fp32", "hello there"])
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in ("ham", "spam") and 0 <= row["spam_probability"] <= 1


def test_predict_truncates_long_messages_with_a_note(trained):
    _, adapter = trained
    result = run_script("predict.py", "--precision", "fp32", "--adapter", adapter, "hello " * 200)
    assert result.returncode == 0 and "truncated to the first" in result.stderr and "Prediction:" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--adapter", "missing.pt", "hi"], "no trained adapter at missing.pt — run python train.py first"),
    (["hi", "  "], "message 2 is empty"),
])
def test_predict_bad_input_is_one_line_and_exit_2(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(predict.main, args, capsys)
    assert code == 2 and message in err and one_line(err)


def test_predict_refuses_a_file_that_is_not_an_adapter(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    code, err = run_main(predict.main, ["--adapter", tmp_path / "x.pt", "hi"], capsys)
    assert code == 2 and "not a readable adapter file" in err and one_line(err)


@pytest.mark.parametrize("changes, message", [({"max_length": 0}, "max_length"), ({"rank": None}, "rank"),
                                              ({"version": "1"}, "version")])
def test_predict_with_a_bad_adapter_is_one_line_and_exit_2(tmp_path, capsys, changes, message):
    path = adapter_file(tmp_path / "a.safetensors", changes)
    code, err = run_main(predict.main, ["--precision", "fp32", "--adapter", path, "hi"], capsys)
    assert code == 2 and one_line(err) and message in err


def test_predict_with_a_nan_adapter_is_one_line_and_exit_2(tmp_path, capsys):
    name = next(n for n in lora.adapter_state(tiny_classifier()) if n.startswith("out_head"))
    path = adapter_file(tmp_path / "a.safetensors", tensor_changes={name: lambda a: a.fill(np.inf)})
    code, err = run_main(predict.main, ["--precision", "fp32", "--adapter", path, "hi"], capsys)
    assert code == 2 and one_line(err) and "NaN or infinite" in err


def predict_json(monkeypatch, capsys, argv, stdin=b""):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try:
        predict.main([str(a) for a in ["--precision", "fp32", "--json", *argv]])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_stdin_splits_on_newline_only(hostile, monkeypatch, capsys):
    adapter = hostile / "a.safetensors"
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", adapter, "-"],
                                  "one\u2028still one\ntwo\x85still two\r\nthree\x0bstill\x0cthree\n".encode())
    assert code == 0, err
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert texts == ["one\u2028still one", "two\x85still two", "three\x0bstill\x0cthree"]


def test_predict_stdin_through_a_real_pipe_keeps_u2028_in_the_message(hostile):
    result = subprocess.run([sys.executable, "predict.py", "--precision", "fp32", "--json", "--adapter",
                             str(hostile / "a.safetensors"), "-"],
                            input="a\u2028b\nc\x85d".encode(), capture_output=True, cwd=HERE, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["text"] for line in result.stdout.decode().splitlines()] == ["a\u2028b", "c\x85d"]


def test_predict_double_dash_makes_dash_a_literal_message(hostile, monkeypatch, capsys):
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", hostile / "a.safetensors", "--", "-", "--json"],
                                  b"this must not be read\n")
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.splitlines()] == ["-", "--json"]


@pytest.mark.parametrize("stdin", [b""])
def test_predict_empty_stdin_says_no_messages_were_given(hostile, monkeypatch, capsys, stdin):
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", hostile / "a.safetensors", "-"], stdin)
    assert code == 2 and one_line(err) and "no messages were given" in err and out == ""


def test_predict_skips_blank_stdin_lines_and_counts_them(hostile, monkeypatch, capsys):
    stdin = b"hi\n\nthere\n  \n\n"
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", hostile / "a.safetensors", "-"], stdin)
    assert code == 0 and "note: skipped 3 blank line(s) on stdin" in err
    assert [(r["line"], r["text"]) for r in map(json.loads, out.splitlines())] == [(1, "hi"), (3, "there")]


@pytest.mark.parametrize("value", ["2", "-0.1", "nan", "inf", "x"])
def test_predict_threshold_outside_0_1_is_exit_2(hostile, capsys, value):
    code, err = run_main(predict.main, ["--precision", "fp32", "--adapter", hostile / "a.safetensors",
                                        "--threshold", value, "hi"], capsys)
    assert code == 2 and one_line(err) and "threshold" in err


def test_predict_json_never_prints_nan(hostile, tmp_path, monkeypatch, capsys):
    tensors = random_tensors(tiny_cfg())
    tensors["wte"][:] = np.nan  # the same shape as the trained-on model, but damaged
    gpt2.write_model_folder(tmp_path / "model", tiny_cfg(), tensors)
    write_tiny_bpe(tmp_path / "model")
    # an adapter from before base-weight fingerprints, which would refuse these weights before any forward pass
    arrays, header = formats.read_safetensors(hostile / "a.safetensors", with_metadata=True)
    header = {k: v for k, v in header.items() if k != "base_fingerprint"}
    formats.write_safetensors({k: np.array(v) for k, v in arrays.items()}, tmp_path / "old.safetensors", header)
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", tmp_path / "old.safetensors", "--model-dir",
                                                        tmp_path / "model", "hello", "WIN a prize"])
    assert out == ""  # nothing printed, not even for the messages before the bad one
    err = err.split("\n", 1)[1]  # after the note that the base weights cannot be checked
    assert code == 2 and one_line(err) and "finite" in err


def test_confidence_is_the_probability_of_the_label_shown(trained, capsys):
    _, adapter = trained
    text = "WIN a FREE prize 7 now call 0900"
    predict.main(["--precision", "fp32", "--adapter", str(adapter), "--json", text])
    p_spam = json.loads(capsys.readouterr().out)["spam_probability"]
    for threshold in (0.0, 1.0):  # the label flips with the threshold; the confidence must follow it
        predict.main(["--precision", "fp32", "--adapter", str(adapter), "--threshold", str(threshold), text])
        shown = re.search(r"Prediction: (SPAM|HAM \(Normal\)) \(Confidence: (\d\.\d\d)\)", capsys.readouterr().out)
        want = p_spam if shown.group(1) == "SPAM" else 1 - p_spam
        assert (shown.group(1) == ("SPAM" if threshold == 0.0 else "HAM (Normal)")
                and float(shown.group(2)) == round(want, 2))


def test_predict_with_stdin_closed_says_so_in_one_line(trained):
    result = subprocess.run([sys.executable, str(HERE / "predict.py"), "--adapter", str(trained[1]), "-"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=HERE,
                            preexec_fn=lambda: os.close(0))
    assert result.returncode == 2 and one_line(result.stderr) and "stdin is closed" in result.stderr


def test_predict_escapes_what_the_output_encoding_cannot_show(trained):
    result = subprocess.run([sys.executable, str(HERE / "predict.py"), "--adapter", str(trained[1]),
                             "--precision", "fp32", "--", "caf\u00e9 \U0001f600"], capture_output=True,
                            cwd=HERE, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert b"\\U0001f600" in result.stdout and b"Prediction: " in result.stdout


def test_predict_refuses_other_base_weights_of_the_same_shape(trained, workdir, tmp_path):
    other = tmp_path / "other"
    gpt2.write_model_folder(other, tiny_cfg(), random_tensors(tiny_cfg(), seed=11))
    write_tiny_bpe(other)
    result = run_script("predict.py", "--adapter", trained[1], "--model-dir", other, "--precision", "fp32", "hi")
    assert result.returncode == 2 and one_line(result.stderr) and "fingerprint" in result.stderr, result.stderr
    meta = lora.read_adapter(trained[1])[0]
    assert meta["base_fingerprint"] in result.stderr


def test_predict_reads_an_adapter_without_a_fingerprint_with_a_note(trained, tmp_path):
    tensors, header = formats.read_safetensors(trained[1], with_metadata=True)
    header = {k: v for k, v in header.items() if k != "base_fingerprint"}
    formats.write_safetensors({k: np.array(v) for k, v in tensors.items()}, tmp_path / "old.safetensors", header)
    result = run_script("predict.py", "--adapter", tmp_path / "old.safetensors", "--precision", "fp32", "hi")
    assert result.returncode == 0, result.stderr
    assert "does not record which base weights" in result.stderr and "Prediction: " in result.stdout


def test_predict_says_the_trained_on_folder_is_gone_before_any_download(trained, tmp_path, monkeypatch, capsys):
    tensors, header = formats.read_safetensors(trained[1], with_metadata=True)
    header = {**header, "model_dir": json.dumps(str(tmp_path / "moved-away")), "downloaded": "false"}
    formats.write_safetensors({k: np.array(v) for k, v in tensors.items()}, tmp_path / "a.safetensors", header)
    monkeypatch.setattr(cli, "download_file", lambda *a, **k: pytest.fail("no download may start"))
    code, err = run_main(predict.main, ["--adapter", tmp_path / "a.safetensors", "--precision", "fp32", "hi"], capsys)
    assert code == 2 and one_line(err) and "moved-away, which is gone; pass --model-dir" in err, err


def test_predict_is_a_filter_results_come_while_the_pipe_stays_open(trained):
    command = [sys.executable, str(HERE / "predict.py"), "--adapter", str(trained[1]), "--precision", "fp32",
               "--json", "-"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE) as proc:
        proc.stdin.write("WIN a FREE prize 1 now call 0900 x \n\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())  # read while stdin is still open
        proc.stdin.write("hey are we still on for lunch 3 ok\n")
        proc.stdin.flush()
        second = json.loads(proc.stdout.readline())
        proc.stdin.close()
        rest = proc.stdout.read()
    assert proc.returncode == 0 and rest == ""
    assert (first["line"], first["label"], second["line"], second["label"]) == (1, "spam", 3, "ham")


def test_predict_streams_many_lines_in_input_order(trained, tmp_path):
    texts = [text for text, _ in synthetic_messages(60, 20)] * 5  # 400 lines: several read-ahead groups
    result = subprocess.run([sys.executable, str(HERE / "predict.py"), "--adapter", str(trained[1]), "--precision",
                             "fp32", "--json", "--batch-size", "8", "-"], input="\n".join(texts) + "\n",
                            capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 401)) and [r["text"] for r in rows] == texts
    probs = {}
    for r in rows:  # the same message scores the same in whatever group it was classified
        assert probs.setdefault(r["text"], r["spam_probability"]) == pytest.approx(r["spam_probability"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# bench.py: kept working (its figures are measurements, so nothing here asserts a speed)


def test_bench_quick_on_the_tiny_config_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--quick", "--model", "tiny", "--out", out)
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert {"peak", "train_step", "attention", "epoch", "load", "predict", "memory"} <= r.keys(), r.keys()
    figures = [r["train_step"]["seconds_per_step"], r["train_step"]["mfu"], r["epoch"]["ratio"], r["load"]["seconds"],
               r["load"]["read_seconds"], r["memory"]["train_peak_rss_mib"]]
    figures += [ms for case in r["attention"].values() for ms in case.values()]
    assert len(r["attention"]) == 6  # fp32 and bf16, at 30, 120 and 256 tokens
    if (SHARED / "gpt2-bpe" / "vocab.bpe").exists():  # predict needs a real tokenizer for the 50,257 vocabulary
        figures += [r["predict"]["cold_start_s"], r["predict"]["import_torch_s"], r["memory"]["predict_peak_rss_mib"]]
    assert all(isinstance(x, float) and x > 0 for x in figures), figures
    # the counts behind the epoch comparison are exact: dynamic padding must process fewer tokens
    assert r["epoch"]["dynamic_bucketed"]["tokens_with_padding"] < r["epoch"]["fixed_120"]["tokens_with_padding"]
    assert r["train_step"]["flops_per_step"] == bench_flops_by_hand()
    # a smoke run judges no target, but the targets of its figures can still be computed
    assert "Targets: not judged in a --quick run" in result.stdout and "MISSED" not in result.stdout
    labels = " ".join(label for label, _ in bench.targets(r))
    for label in ("train_step MFU", "epoch ratio", "load"):
        assert label in labels


def test_bench_epoch_runs_when_fp32_is_the_chosen_precision(tmp_path):
    """On a CPU where bf16 is slow, auto picks fp32: the padding comparison must then use fp32."""
    result = run_script("bench.py", "--quick", "--model", "tiny", "--only", "epoch", "--precision", "fp32",
                        "--out", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["precision"] == "fp32" and r["epoch"]["precision_ratio"] == 1.0 and r["epoch"]["ratio"] > 0


def bench_flops_by_hand():
    """bench.py's tiny config (C=64, L=2, V=50257), rank 16 on every Linear, a 2-class head, 8 x 120 tokens."""
    C, L, tokens, T = 64, 2, 8 * 120, 120
    frozen = L * (12 * C * C + 13 * C) + 2 * C
    trainable = L * 16 * (4 * 2 * C + 2 * 5 * C) + (C * 2 + 2)
    return 4 * frozen * tokens + 12 * L * 8 * T * T * C + 6 * trainable * tokens
