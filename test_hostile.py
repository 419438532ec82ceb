"""Hostile-input tests (issue 10): every bad input ends in one line on stderr and exit code 2
(Ctrl-C: 130), never a traceback, never a silently wrong result, never a half-written file.

Usage:
    python -m pytest -q test_hostile.py
"""

from test_lora import *  # noqa: F401,F403  (helpers: tiny_cfg, write_model_folder, run_main, ...)

for _name in [n for n in globals() if n.startswith("test_")]:  # test_lora's own tests run from test_lora.py
    del globals()[_name]
from test_lora import (ADAPTER_META, HERE, one_line, random_tensors, run_main, synthetic_messages,  # noqa: F401
                       tiny_cfg, tiny_classifier, to_hf_layout, write_model_folder, write_sms_file, write_tiny_bpe)

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import gpt2
import lora
import predict
import train


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A tiny model folder, a messages file and one adapter trained on them, made once."""
    root = tmp_path_factory.mktemp("hostile")
    write_model_folder(root / "model", tiny_cfg(), random_tensors(tiny_cfg()))
    write_tiny_bpe(root / "model")
    write_sms_file(root / "sms.txt", synthetic_messages(60, 20))
    # in-process: ~1 s instead of ~3 s for a subprocess
    train.main(["--model-dir", str(root / "model"), "--data", str(root / "sms.txt"), "--epochs", "1",
                "--rank", "2", "--precision", "fp32", "--out", str(root / "a.safetensors")])
    return root


def base_train_args(hostile, out):
    return ["--model-dir", hostile / "model", "--data", hostile / "sms.txt", "--epochs", "1", "--rank", "2",
            "--precision", "fp32", "--out", out]


# ----------------------------------------------------------------------------------------------
# (a) the safetensors reader checks the whole header before touching data


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
    with pytest.raises(gpt2.CheckpointError, match=message) as e:
        gpt2.read_safetensors(path)
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
    with pytest.raises(gpt2.CheckpointError, match=message) as e:
        gpt2.read_safetensors(path)
    assert str(path) in str(e.value)


def test_safetensors_duplicate_tensor_name_is_refused(tmp_path):
    blob = (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    with pytest.raises(gpt2.CheckpointError, match="twice"):
        gpt2.read_safetensors(path)


@pytest.mark.parametrize("shape", [[0, 10**30], [0] + [1] * 80, [10**30, 0], [0, 2**63]])
def test_safetensors_empty_tensor_with_absurd_shape_is_a_checkpoint_error(tmp_path, shape):
    """A zero-byte tensor may still claim a shape numpy cannot build: refused by the header check,
    not by a numpy ValueError (or a wrong-shaped load) later."""
    header = {"e": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors(header, GOOD_TENSORS["a"].tobytes()))
    try:
        tensors = gpt2.read_safetensors(path)
    except gpt2.CheckpointError as e:
        assert "'e'" in str(e)
    else:
        assert list(tensors["e"].shape) == shape  # loaded as declared, never silently reshaped


def test_safetensors_good_file_round_trips(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors(good_header(), GOOD_DATA))
    tensors = gpt2.read_safetensors(path)
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
            header, _, start = gpt2.read_safetensors_header(path)
            tensors = gpt2.read_safetensors(path)
        except gpt2.CheckpointError:
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
# (b) config values must be true ints within bounds; a float16 checkpoint loads


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
    (tmp_path / file_name).write_text(json.dumps(values))
    with pytest.raises(gpt2.CheckpointError, match=repr(value).replace(".", r"\.")) as e:
        gpt2.read_config(tmp_path)
    assert file_name in str(e.value)

    def no_allocation(*a, **k):
        raise AssertionError("the model was built from a bad config")
    monkeypatch.setattr(gpt2, "GPTModel", no_allocation)
    with pytest.raises(gpt2.CheckpointError):
        gpt2.load_gpt2(tmp_path)


def test_config_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    for text in ("[1, 2]", "not json", '"x"', "{}"):
        (tmp_path / "hparams.json").write_text(text)
        with pytest.raises(gpt2.CheckpointError, match="hparams.json"):
            gpt2.read_config(tmp_path)


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16") / "model"
    tensors = {k: v.astype(np.float16) for k, v in random_tensors(tiny_cfg()).items()}
    write_model_folder(folder, tiny_cfg(), tensors, fmt="hf")
    write_tiny_bpe(folder)
    return folder, tensors


def test_float16_safetensors_loads_as_float32_with_the_same_values(fp16_model, tmp_path):
    folder, tensors = fp16_model
    model = gpt2.load_gpt2(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.tok_emb.weight, torch.from_numpy(tensors["wte"].astype(np.float32)))
    # the same weights stored as float32 give the same logits
    write_model_folder(tmp_path / "f32", tiny_cfg(), {k: v.astype(np.float32) for k, v in tensors.items()}, fmt="hf")
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


# ----------------------------------------------------------------------------------------------
# (c) adapter metadata schema


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


def adapter_file(path, meta_changes=None, tensor_changes=None):
    """A valid adapter file, then its metadata and tensors changed as given, written raw."""
    model = tiny_classifier()
    lora.save_adapter(model, path, ADAPTER_META)
    tensors, header = gpt2.read_safetensors(path, with_metadata=True)
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
    gpt2.write_safetensors(tensors, path, metadata=header)
    return path


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
    tensors, header = gpt2.read_safetensors(path, with_metadata=True)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    path.unlink()
    gpt2.write_safetensors(tensors, path, metadata={**header, "rank": "{not json"})
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


# ----------------------------------------------------------------------------------------------
# (d) train.py: bad arguments stop before anything is loaded


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
def test_train_bad_number_is_one_line_and_exit_2(tmp_path, capsys, args):
    out = tmp_path / "a.safetensors"
    code, err = run_main(train.main, ["--model-dir", MISSING_MODEL, "--precision", "fp32", "--out", out, *args],
                         capsys)
    assert code == 2 and one_line(err), err
    assert "folder" not in err or "--out" in err  # refused by the argument check, not by the model load
    assert not out.exists()


@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:3", "bogus", "cpu:x"])
def test_train_unusable_device_lists_the_available_ones(hostile, tmp_path, capsys, device):
    if device in gpt2.available_devices() or (device == "cuda" and torch.cuda.is_available()):
        pytest.skip(f"{device} is usable here")
    code, err = run_main(train.main, [*base_train_args(hostile, tmp_path / "a.safetensors"), "--device", device],
                         capsys)
    assert code == 2 and one_line(err) and "available: auto, cpu" in err
    assert not (tmp_path / "a.safetensors").exists()


def test_train_loss_turning_non_finite_stops_with_one_line_and_writes_nothing(hostile, tmp_path, capsys):
    tensors = random_tensors(tiny_cfg())
    tensors["ln_f/g"][0] = np.nan  # a damaged base model: every logit becomes NaN
    write_model_folder(tmp_path / "model", tiny_cfg(), tensors)
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


# ----------------------------------------------------------------------------------------------
# (e) predict.py: stdin, "--", empty input, thresholds, JSON


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


def test_predict_blank_stdin_line_is_refused(hostile, monkeypatch, capsys):
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", hostile / "a.safetensors", "-"], b"hi\n\nthere\n")
    assert code == 2 and one_line(err) and "message 2 is empty" in err and out == ""


@pytest.mark.parametrize("value", ["2", "-0.1", "nan", "inf", "x"])
def test_predict_threshold_outside_0_1_is_exit_2(hostile, capsys, value):
    code, err = run_main(predict.main, ["--precision", "fp32", "--adapter", hostile / "a.safetensors",
                                        "--threshold", value, "hi"], capsys)
    assert code == 2 and one_line(err) and "threshold" in err


def test_predict_json_never_prints_nan(hostile, tmp_path, monkeypatch, capsys):
    tensors = random_tensors(tiny_cfg())
    tensors["wte"][:] = np.nan  # the same shape as the trained-on model, but damaged
    write_model_folder(tmp_path / "model", tiny_cfg(), tensors)
    write_tiny_bpe(tmp_path / "model")
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", hostile / "a.safetensors", "--model-dir",
                                                        tmp_path / "model", "hello", "WIN a prize"])
    assert "NaN" not in out and "nan" not in out.lower()
    assert code == 2 and one_line(err) and "finite" in err


def test_predict_json_probabilities_are_finite_numbers(hostile, monkeypatch, capsys):
    code, out, err = predict_json(monkeypatch, capsys, ["--adapter", hostile / "a.safetensors", "hello", "x" * 500])
    assert code == 0
    for line in out.splitlines():
        row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
        assert 0 <= row["spam_probability"] <= 1 and row["label"] in ("ham", "spam")


# ----------------------------------------------------------------------------------------------
# (f) Ctrl-C right at the start, while torch imports


@pytest.mark.parametrize("script", ["train.py", "predict.py", "data.py", "gpt2.py"])
def test_ctrl_c_while_importing_is_exit_130_and_one_line(script, tmp_path):
    args = {"train.py": ["--precision", "fp32", "--out", str(tmp_path / "a.safetensors")],
            "predict.py": ["--precision", "fp32", "hello"], "data.py": [], "gpt2.py": ["--help"]}[script]
    proc = subprocess.Popen([sys.executable, script, *args], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    assert proc.poll() is None, "the script ended before the interrupt"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert one_line(err) and "interrupted" in err, err
    assert not (tmp_path / "a.safetensors").exists()
