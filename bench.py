"""Measure what users feel, in both precisions: training speed (and MFU), epoch time, load time,
predict start-up and throughput, memory.

Everything runs offline on random weights of the real shapes, so no download is needed; the epoch
uses the real SMS training and validation splits when ../shared/data has them. Each figure is a
median over repeated runs after a warm-up, with min and max. The machine's own matmul rates
("peak", fp32 and bf16) are measured in the same process right before and after the timed work,
since shared machines are noisy; MFU divides by the peak of the precision in use.

Model FLOPs of one training step (B sequences of T tokens, L layers, width C):
    4 N B T + 12 L B T^2 C + 6 N_lora B T
N: the frozen non-embedding weights, used in the forward (2 N per token) and in the backward for
input gradients only (2 N; frozen weights get no weight gradient); 12 L B T^2 C: attention scores
and their weighted sum, forward (4 L B T^2 C) and backward (twice that); N_lora: LoRA and head
weights, which also get weight gradients (6 per token).

Usage:
    python bench.py                            # the full table, both precisions, writes bench.json
    python bench.py --quick --model tiny
    python bench.py --model 1558M --only train_step --quick     # GPT-2 XL: step time and memory
    python bench.py --model 1558M --only train_step --quick --gradient-checkpointing
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.exit_on_signals_while_importing("bench.py")  # torch takes about 2 s to import

import argparse
import contextlib
import copy
import io
import itertools
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data
import gpt2
import lora
import train

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared" / "data"
SECTIONS = ("peak", "train_step", "attention", "epoch", "load", "predict", "memory")
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TINY = gpt2.GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2)
FIXED_T = 120  # the reference course pads every message to its longest training message: 120 tokens


def config_of(name):
    return TINY if name == "tiny" else gpt2.GPT2_SIZES[gpt2.resolve_size(name)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "runs": len(samples)}


def timed(fn, runs, warmup=1, device=torch.device("cpu")):
    """Wall times of runs calls of fn() after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------------------------
# peak: this machine's matmul rate in each precision


def matmul_rate(m, k, n, device, runs, dtype=torch.float32):
    """GFLOP/s of an (m, k) @ (k, n) product: the best of runs, i.e. what the machine can do when
    nothing else disturbs it (a noisy reading can only make it look slower)."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    times = timed(lambda: torch.mm(a, b), runs, warmup=2, device=device)
    return 2 * m * k * n / min(times) / 1e9


def measure_peak(cfg, device, runs, tokens):
    C = cfg.emb_dim
    shapes = {"2048x2048x2048": (2048, 2048, 2048), f"qkv {tokens}x{C}x{3 * C}": (tokens, C, 3 * C),
              f"fc {tokens}x{C}x{4 * C}": (tokens, C, 4 * C), f"proj {tokens}x{4 * C}x{C}": (tokens, 4 * C, C)}
    return {p: {name: matmul_rate(*shape, device, runs, DTYPES[p]) for name, shape in shapes.items()}
            for p in PRECISIONS}


# ----------------------------------------------------------------------------------------------
# train_step: forward + loss + backward + AdamW on B x T, with LoRA on every Linear


def build_classifier(cfg, rank, device, precision="fp32", seed=0):
    """The classifier train.py trains, on random weights laid out as load_gpt2 lays them out: in
    bf16 the blocks' Linear weights are bf16 from the start, so no float32 copy ever exists."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = gpt2.GPTModel(cfg)
    gpt2.cast_matmuls(model, DTYPES[precision])
    model = model.to_empty(device=device)
    model.init_weights()
    return lora.build_classifier(model, 2, rank=rank, alpha=rank)


def step_flops(cfg, B, T, n_trainable):
    C, L = cfg.emb_dim, cfg.n_layers
    n_frozen = L * (12 * C * C + 13 * C) + 2 * C
    return 4 * n_frozen * B * T + 12 * L * B * T * T * C + 6 * n_trainable * B * T


def make_step(model, optimizer, B, T, device, precision):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=gen).to(device)
    last = torch.full((B,), T - 1, device=device)
    labels = torch.randint(0, 2, (B,), generator=gen).to(device)
    model.train()
    return lambda: train.train_step(model, optimizer, [(ids, last, labels)], precision)  # train.py's own step


def bench_train_step(cfg, rank, device, precision, steps, peak_runs, warmup=2, B=8, T=FIXED_T, checkpointing=False):
    """Runs in its own process (see --child) so that its peak RSS is its own."""
    model = build_classifier(cfg, rank, device, precision)
    model.gradient_checkpointing = checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    step = make_step(model, optimizer, B, T, device, precision)
    peak_before = matmul_rate(2048, 2048, 2048, device, peak_runs, DTYPES[precision])
    times = timed(step, steps, warmup=warmup, device=device)
    peak_after = matmul_rate(2048, 2048, 2048, device, peak_runs, DTYPES[precision])
    flops = step_flops(cfg, B, T, sum(p.numel() for p in trainable))
    peak = max(peak_before, peak_after)  # the faster reading is the better estimate of the machine
    achieved = flops / statistics.median(times) / 1e9
    return {"precision": precision, "batch": [B, T], "gradient_checkpointing": checkpointing,
            "seconds_per_step": statistics.median(times),
            "seconds": summary(times), "examples_per_s": B / statistics.median(times), "flops_per_step": flops,
            "achieved_gflops": achieved, "peak_gflops_before": peak_before, "peak_gflops_after": peak_after,
            "mfu": achieved / peak, "peak_rss_mib": peak_rss_mib()}


def bench_attention(cfg, device, runs, B=8, lengths=(30, FIXED_T, 256)):
    """Milliseconds of one attention forward + backward, (B, heads, T, head_dim), in each precision:
    PyTorch's fused kernel against the equation written out (gpt2.causal_attention), which the
    model takes for bf16 training on a CPU up to 256 tokens. 30 tokens: about a typical SMS batch."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for p, T in itertools.product(PRECISIONS, lengths):
        shape = (B, cfg.n_heads, T, cfg.emb_dim // cfg.n_heads)
        q, k, v = (torch.randn(shape, generator=gen).to(device, DTYPES[p]).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen).to(device, DTYPES[p])
        kernels = {"fused": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                   "written_out": lambda: gpt2.causal_attention(q, k, v)}
        out[f"{p}_T{T}"] = {name: 1e3 * statistics.median(timed(lambda: f().backward(grad), 5 * runs, 3, device))
                            for name, f in kernels.items()}
    return out


def peak_rss_mib():
    """This process's peak resident memory. VmHWM belongs to the address space made at exec; the
    rusage figure would also count the parent's memory at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


# Runs a script as `python script args...` would, then reports its peak memory on the last line of stderr
PEAK_RUNNER = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.path.insert(0, {here!r})
    import bench
    print("peak_rss_mib", bench.peak_rss_mib(), file=sys.stderr)
"""


# ----------------------------------------------------------------------------------------------
# epoch: train.py's epoch (training split + validation), and dynamic padding vs fixed 120 tokens


class ByteTokenizer:
    """Stand-in tokenizer for the synthetic fallback: one token per byte."""
    eot_token = 0

    def encode_ordinary(self, text):
        return list(text.encode())


def epoch_splits():
    """The real splits and GPT-2's tokenizer when ../shared/data has them, else synthetic ones."""
    if (SHARED / "SMSSpamCollection").exists() and (SHARED / "gpt2-bpe" / "vocab.bpe").exists():
        splits = data.split_dataset(data.load_messages(SHARED / "SMSSpamCollection"), seed=42)
        return splits, gpt2.load_tokenizer(SHARED / "gpt2-bpe"), "real SMS training + validation split"
    rng = random.Random(0)  # lengths spread like SMS token counts: median about 30, a long tail
    lengths = [max(2, min(FIXED_T, int(rng.lognormvariate(3.3, 0.6)))) for _ in range(1045 + 149)]
    msgs = [("a" * n, i % 2) for i, n in enumerate(lengths)]
    splits = {"train": msgs[:1045], "val": msgs[1045:]}
    return splits, ByteTokenizer(), "synthetic length distribution (no ../shared/data)"


def time_epoch(model, loaders, optimizer, device, precision, batches=None):
    """Seconds of train.py's epoch (all or the first `batches` training batches, then validation)."""
    train_batches = list(itertools.islice(loaders["train"], batches))
    args = argparse.Namespace(log_every=10**9, grad_accum=1, max_grad_norm=None)  # train.py's defaults, no log
    with contextlib.redirect_stdout(io.StringIO()):
        train.train_epoch(model, train_batches[:1], optimizer, device, 1, args, precision)  # warm-up
        sync(device)
        start = time.perf_counter()
        train.train_epoch(model, train_batches, optimizer, device, 1, args, precision)
        if "val" in loaders:
            train.spam_probabilities(model, loaders["val"], device, precision)
        sync(device)
    return time.perf_counter() - start


def bench_epoch(cfg, rank, device, quick, chosen):
    splits, tokenizer, source = epoch_splits()
    splits = {"train": splits["train"][:32], "val": splits["val"][:16]} if quick else splits
    results = {"data": source, "messages": len(splits["train"]), "val_messages": len(splits["val"])}
    loaders = data.make_loaders(splits, tokenizer, batch_size=8, seed=42, context_length=cfg.context_length)
    for precision in sorted(PRECISIONS, key=lambda p: p == chosen):  # the chosen one last: its model stays
        model = build_classifier(cfg, rank, device, precision)  # the whole epoch as train.py times it
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        results[f"train_and_val_{precision}_s"] = time_epoch(model, loaders, optimizer, device, precision)
    results["precision_ratio"] = results[f"train_and_val_{chosen}_s"] / results["train_and_val_fp32_s"]
    # dynamic padding against the reference course's fixed 120 tokens, in the chosen precision; every
    # fixed batch has the same shape (8 x 120), so a few of them time them all
    fixed = data.make_loaders({"train": splits["train"]}, tokenizer, batch_size=8, seed=42, bucket=False,
                              pad_to=FIXED_T, max_length=FIXED_T, context_length=cfg.context_length)
    train_only = {"train": loaders["train"]}
    for name, loader_set, timed_batches in (("dynamic_bucketed", train_only, None),
                                             ("fixed_120", fixed, 1 if quick else 12)):
        batches = len(loader_set["train"])
        seconds = time_epoch(model, loader_set, optimizer, device, chosen, timed_batches)
        seconds *= batches / (timed_batches or batches)
        lengths = loader_set["train"].dataset.lengths()
        tokens = (sum(max(lengths[i] for i in b) * len(b) for b in loader_set["train"].batch_sampler)
                  if name == "dynamic_bucketed" else FIXED_T * len(lengths))  # padding included
        results[name] = {"seconds": seconds, "batches": batches, "timed_batches": timed_batches or batches,
                         "tokens_with_padding": tokens}
    results["ratio"] = results["fixed_120"]["seconds"] / results["dynamic_bucketed"]["seconds"]
    return results


# ----------------------------------------------------------------------------------------------
# load: load_gpt2 on a folder bench.py writes, next to reading the data file once


def random_tensors(cfg):
    rng = np.random.default_rng(0)
    return {n: (rng.standard_normal(s, dtype=np.float32) * 0.02) for n, s in gpt2.checkpoint_shapes(cfg).items()}


def write_random_folder(cfg, folder, fmt, tensors=None):
    gpt2.write_model_folder(folder, cfg, tensors or random_tensors(cfg), fmt=fmt)
    for name in ("encoder.json", "vocab.bpe"):
        if (SHARED / "gpt2-bpe" / name).exists():
            (folder / name).write_bytes((SHARED / "gpt2-bpe" / name).read_bytes())
    return folder


def bench_load(cfg, work, runs):
    results, tensors = {}, random_tensors(cfg)
    for fmt in ("openai", "hf"):
        folder = write_random_folder(cfg, work / f"model-{fmt}", fmt, tensors)
        data_file = folder / ("model.ckpt.data-00000-of-00001" if fmt == "openai" else "model.safetensors")

        def read_once():
            with open(data_file, "rb") as f:
                f.read()
        read = timed(read_once, runs)
        load = timed(lambda: gpt2.load_gpt2(folder), runs)
        load_bf16 = timed(lambda: gpt2.load_gpt2(folder, dtype=torch.bfloat16), runs)
        model = gpt2.load_gpt2(folder)
        ids = torch.zeros(1, 8, dtype=torch.long)
        with torch.inference_mode():
            first = timed(lambda: model(ids), 1, warmup=0)  # pages the weights in (already cached here)
        results[fmt] = {"seconds": statistics.median(load), "load": summary(load),
                        "bf16_seconds": statistics.median(load_bf16), "read_seconds": statistics.median(read),
                        "read": summary(read), "first_forward_s": first[0], "file_mb": data_file.stat().st_size / 1e6}
    results["seconds"], results["read_seconds"] = results["openai"]["seconds"], results["openai"]["read_seconds"]
    return results


# ----------------------------------------------------------------------------------------------
# predict: the whole command (cold start, 1,000 messages on stdin; 50 with --quick) and batch-1 latency


def run_timed(cmd, stdin=None) -> float:
    """Wall seconds of one whole command, start-up included."""
    start = time.perf_counter()
    result = subprocess.run(cmd, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=HERE)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {result.stderr.decode().strip()[-300:]}")
    return time.perf_counter() - start


def script_peak_rss_mib(script_and_args) -> float:
    runner = PEAK_RUNNER.format(here=str(HERE))
    result = subprocess.run([sys.executable, "-c", runner, *script_and_args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    last = result.stderr.strip().splitlines()[-1]
    if result.returncode or not last.startswith("peak_rss_mib"):
        raise RuntimeError(f"{script_and_args[0]} failed: {result.stderr.strip()[-300:]}")
    return float(last.split()[1])


def first_messages(n=1000) -> bytes:
    """n SMS texts, one a line: the real ones when ../shared/data has them."""
    if (SHARED / "SMSSpamCollection").exists():
        texts = [t for t, _ in data.load_messages(SHARED / "SMSSpamCollection")][:n]
    else:
        rng = random.Random(1)
        texts = [" ".join(rng.choice(["win", "cash", "call", "now", "lunch", "ok", "see", "you"])
                          for _ in range(rng.randint(3, 40))) for _ in range(n)]
    return "\n".join(t.replace("\n", " ") for t in texts).encode() + b"\n"


def bench_predict(cfg, rank, work, runs, device, latency_pairs=20):
    folder = work / "model-openai"
    if not (folder / "hparams.json").exists():
        write_random_folder(cfg, folder, "openai")
    if not (folder / "vocab.bpe").exists():
        return {"skipped": "needs ../shared/data/gpt2-bpe for the tokenizer"}
    model = lora.build_classifier(gpt2.load_gpt2(folder), 2, rank=rank, alpha=rank)  # as train.py writes it
    adapter = work / "bench_adapter.safetensors"
    lora.save_adapter(model, adapter, {"model": "bench", "model_dir": str(folder), "config": asdict(cfg),
                                       "targets": "all", "max_length": FIXED_T, "labels": list(data.LABELS),
                                       "threshold": 0.5, "precision": "fp32"})
    msg = "Congratulations! You have won a free cruise, call 0800 123 456 now to claim your prize."
    results = {"import_torch": summary([run_timed([sys.executable, "-c", "import torch"]) for _ in range(runs)])}
    results["import_torch_s"] = results["import_torch"]["median"]
    n = 1000 if runs > 1 else 50  # --quick: enough to show the path works
    stdin = first_messages(n)
    chosen = cli.choose_precision("auto", device)[0]
    # --quick: auto and the precision it picks (what a user gets); a full run: both precisions as well
    for precision in ("auto", *PRECISIONS) if runs > 1 else ("auto", chosen):
        args = ["predict.py", "--adapter", str(adapter), "--device", str(device), "--precision", precision]
        cold = [run_timed([sys.executable, *args, msg]) for _ in range(runs)]
        many = [run_timed([sys.executable, *args, "-"], stdin=stdin) for _ in range(max(1, runs // 2))]
        results[precision] = {"cold_start_s": statistics.median(cold), "cold_start": summary(cold),
                              "stdin_messages": n, "stdin_s": statistics.median(many),
                              "messages_per_s": n / statistics.median(many)}
        if precision != "auto":
            results[precision]["peak_rss_mib"] = script_peak_rss_mib([*args, msg])
    results.update(latency(model, gpt2.load_tokenizer(folder), msg, device, latency_pairs))
    return results


def latency(model, tok, msg, device, pairs):
    """Batch-1 latency of a 30-token message: merged and unmerged, timed alternately (so that the
    machine's drift affects both alike), in fp32."""
    ids = torch.tensor([(tok.encode_ordinary(msg) * 3)[:30]], device=device)
    unmerged_model = model.to(device).eval()
    merged_model = copy.deepcopy(unmerged_model)
    lora.merge_lora(merged_model)
    unmerged, merged = [], []
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            unmerged_model(ids), merged_model(ids)
        for _ in range(pairs):
            unmerged += timed(lambda: unmerged_model(ids), 1, warmup=0, device=device)
            merged += timed(lambda: merged_model(ids), 1, warmup=0, device=device)
    return {"latency_unmerged_s": statistics.median(unmerged), "latency_merged_s": statistics.median(merged),
            "latency_unmerged": summary(unmerged), "latency_merged": summary(merged)}


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    p = cli.ArgumentParser(prog="bench.py", description="Benchmarks of training, loading and prediction.")
    p.add_argument("--model", default="124M", help="a GPT-2 size, or tiny (a small test config)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on every Linear")
    p.add_argument("--quick", action="store_true", help="few repetitions, for smoke-testing")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--device", default="auto", help=cli.DEVICE_HELP)
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                   help="the precision whose figures fill the summary keys (both are always measured); "
                        + cli.PRECISION_HELP)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="the train_step section (and so memory) recomputes each block's activations, as "
                        "train.py --gradient-checkpointing does; the epoch section does not")
    p.add_argument("--out", default="bench.json", help="where to write the results")
    p.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)  # bench.py runs a train step
    args = p.parse_args(argv)
    args.cfg = config_of(args.model)
    lora.check_lora_hparams(args.rank, args.rank)
    args.device = cli.pick_device(args.device)
    return args


def run(args):
    steps, warmup, runs = (2, 1, 2) if args.quick else (6, 2, 5)
    if args.child:  # a fresh process: its RSS is the train step's alone
        print(json.dumps(bench_train_step(args.cfg, args.rank, args.device, args.child, steps, runs, warmup,
                                          checkpointing=args.gradient_checkpointing)))
        return
    chosen, why = cli.choose_precision(args.precision, args.device)
    results = {"model": args.model, "rank": args.rank, "device": str(args.device), "quick": args.quick,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": chosen,
               "precision_why": why, "by_precision": {p: {} for p in PRECISIONS}, "wall_seconds": {}}
    sections = args.only or SECTIONS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for section in ("peak", "train_step", "attention", "epoch", "load", "predict", "peak_after"):
            wanted = section in sections or (section == "peak_after" and "peak" in sections) or \
                (section in ("train_step", "predict") and "memory" in sections)
            if wanted:
                start = time.perf_counter()
                run_section(section, args, results, Path(tmp), runs, chosen)
                name = section.removesuffix("_after")
                results["wall_seconds"][name] = results["wall_seconds"].get(name, 0) + time.perf_counter() - start
    if "memory" in sections:
        results["memory"] = {"train_peak_rss_mib": results["train_step"]["peak_rss_mib"],
                             "predict_peak_rss_mib": results["predict"].get(chosen, {}).get("peak_rss_mib")}
    results["wall_seconds"]["total"] = time.perf_counter() - started
    report(results)
    cli.atomic_write(args.out, json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {args.out}")


def run_section(section, args, results, work, runs, chosen):
    cfg, tokens = args.cfg, 8 * FIXED_T
    if section == "peak":
        results["peak"] = {"before": measure_peak(cfg, args.device, runs, tokens)}
    elif section == "peak_after":
        results["peak"]["after"] = measure_peak(cfg, args.device, runs, tokens)
    elif section == "train_step":
        for precision in PRECISIONS:
            child = [sys.executable, str(HERE / "bench.py"), "--child", precision, "--model", args.model,
                     "--rank", str(args.rank), "--device", str(args.device)] + (["--quick"] if args.quick else []) \
                + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
            result = subprocess.run(child, capture_output=True, text=True, cwd=HERE)
            if result.returncode:
                raise RuntimeError(f"the {precision} train-step process failed: {result.stderr.strip()[-500:]}")
            results["by_precision"][precision]["train_step"] = json.loads(result.stdout)
        results["train_step"] = results["by_precision"][chosen]["train_step"]
    elif section == "attention":
        results["attention"] = bench_attention(cfg, args.device, runs)
    elif section == "epoch":
        results["epoch"] = bench_epoch(cfg, args.rank, args.device, args.quick, chosen)
    elif section == "load":
        results["load"] = bench_load(cfg, work, runs)
    elif section == "predict":  # --quick: one cold start and five latency pairs, enough to show it works
        results["predict"] = bench_predict(cfg, args.rank, work, 1 if args.quick else 5, args.device,
                                           5 if args.quick else 20)
        if chosen in results["predict"]:
            results["predict"]["cold_start_s"] = results["predict"][chosen]["cold_start_s"]


def report(r):
    """Print the table and the targets."""
    rows = []
    if "peak" in r:
        for p in PRECISIONS:
            for name, rate in r["peak"]["before"][p].items():
                after = r["peak"].get("after", {}).get(p, {}).get(name, float("nan"))
                rows.append(("peak", f"{p} mm {name} GFLOP/s (before / after)", f"{rate:,.1f} / {after:,.1f}"))
    for p in PRECISIONS:
        t = r["by_precision"][p].get("train_step")
        if t:
            s = t["seconds"]
            recompute = ", gradient checkpointing" if t["gradient_checkpointing"] else ""
            rows += [("train_step", f"{p} s/step, batch {t['batch'][0]}x{t['batch'][1]}{recompute} (median [min, max])",
                      f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"),
                     ("train_step", f"{p} model GFLOP/step | achieved GFLOP/s",
                      f"{t['flops_per_step'] / 1e9:,.1f} | {t['achieved_gflops']:,.1f}"),
                     ("train_step", f"{p} MFU (achieved / {p} peak 2048 mm)", f"{t['mfu']:.2f}"),
                     ("train_step", f"{p} peak RSS MiB", f"{t['peak_rss_mib']:,.0f}")]
    for case, ms in r.get("attention", {}).items():  # e.g. "bf16_T120"
        p, T = case.split("_T")
        rows.append(("attention", f"{p} fwd+bwd, 8 x {T} tokens, ms: fused kernel | written out",
                     f"{ms['fused']:.2f} | {ms['written_out']:.2f}"))
    rows += report_epoch(r) + report_load_predict(r)
    width = max(len(name) for _, name, _ in rows) if rows else 10
    print(f"bench.py: model {r['model']}, LoRA rank {r['rank']}, {r['device']}, {r['threads']} threads, "
          f"torch {r['torch']}; precision {r['precision']} ({r['precision_why']})")
    for section, name, value in rows:
        print(f"  {section:<11} {name:<{width}}  {value}")
    w = r["wall_seconds"]
    print("Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in w.items() if k != "total")
          + f"; total {w.get('total', 0):.1f} s (plus start-up)")
    if r["quick"]:  # a smoke run of a few steps can neither meet nor miss a target
        print("\nTargets: not judged in a --quick run")
        return
    print("\nTargets:")
    for label, ok in targets(r):
        print(f"  [{'met' if ok else 'MISSED'}] {label}")


def report_epoch(r):
    if "epoch" not in r:
        return []
    e = r["epoch"]
    rows = [("epoch", f"{p} train + val epoch, s ({e['messages']:,} + {e['val_messages']:,} msgs, {e['data']})",
             f"{e[f'train_and_val_{p}_s']:.1f}") for p in PRECISIONS]
    rows += [("epoch", f"{r['precision']} / fp32 epoch", f"{e['precision_ratio']:.2f}"),
             ("epoch", f"dynamic + buckets, train only, s ({r['precision']})",
              f"{e['dynamic_bucketed']['seconds']:.1f}"),
             ("epoch", f"fixed {FIXED_T}-token padding, s ({e['fixed_120']['timed_batches']} of "
                       f"{e['fixed_120']['batches']} batches timed)", f"{e['fixed_120']['seconds']:.1f}"),
             ("epoch", "tokens incl. padding: dynamic | fixed",
              f"{e['dynamic_bucketed']['tokens_with_padding']:,} | {e['fixed_120']['tokens_with_padding']:,}"),
             ("epoch", "ratio fixed / dynamic", f"{e['ratio']:.2f}x")]
    return rows


def report_load_predict(r):
    rows = []
    if "load" in r:
        for fmt in ("openai", "hf"):
            x = r["load"][fmt]
            rows += [("load", f"load_gpt2 {fmt} s: fp32 | bf16 | read data file once ({x['file_mb']:,.0f} MB)",
                      f"{x['seconds']:.3f} | {x['bf16_seconds']:.3f} | {x['read_seconds']:.3f}"),
                     ("load", f"first forward after load ({fmt}), s", f"{x['first_forward_s']:.3f}")]
    x = r.get("predict", {})
    if "import_torch_s" in x:
        rows.append(("predict", "python -c 'import torch', s", f"{x['import_torch_s']:.2f}"))
        for p in [p for p in ("auto", *PRECISIONS) if p in x]:
            rows += [("predict", f"{p}: cold start s | {x[p]['stdin_messages']:,} messages on stdin s (msgs/s)",
                      f"{x[p]['cold_start_s']:.2f} | {x[p]['stdin_s']:.1f} ({x[p]['messages_per_s']:.0f})")]
            if "peak_rss_mib" in x[p]:
                rows.append(("predict", f"{p}: peak RSS MiB", f"{x[p]['peak_rss_mib']:,.0f}"))
        rows.append(("predict", "batch-1 latency, 30 tokens, fp32: merged | unmerged, ms",
                     f"{1e3 * x['latency_merged_s']:.1f} | {1e3 * x['latency_unmerged_s']:.1f}"))
    return rows


def targets(r):
    out, chosen = [], r["precision"]
    bf16 = r["by_precision"]["bf16"].get("train_step")
    recompute = " (gradient checkpointing)" if r.get("train_step", {}).get("gradient_checkpointing") else ""
    if "train_step" in r:
        out.append((f"train_step MFU ({chosen}){recompute} {r['train_step']['mfu']:.2f} >= 0.70 (fp32) / 0.45 (bf16)",
                    r["train_step"]["mfu"] >= (0.45 if chosen == "bf16" else 0.70)))
    limit = {"124M": 1.1, "1558M": 6.0}.get(gpt2.SIZE_ALIASES.get(r["model"], r["model"]))  # GiB
    if bf16 and limit:
        out.append((f"bf16 train peak RSS{recompute} {bf16['peak_rss_mib'] / 1024:.2f} GiB <= {limit} GiB "
                    f"({r['model']})",
                    bf16["peak_rss_mib"] <= limit * 1024))
    if "epoch" in r:
        e = r["epoch"]
        out.append((f"epoch {chosen} / fp32 {e['precision_ratio']:.2f} <= 0.40", e["precision_ratio"] <= 0.40))
        out.append((f"epoch ratio fixed / dynamic {e['ratio']:.2f}x >= 3x", e["ratio"] >= 3))
    x = r.get("predict", {})
    if "auto" in x:
        out.append((f"predict cold start (auto) {x['auto']['cold_start_s']:.2f} s <= import torch "
                    f"{x['import_torch_s']:.2f} s + 1.0 s", x["auto"]["cold_start_s"] <= x["import_torch_s"] + 1.0))
        out.append((f"merged latency {1e3 * x['latency_merged_s']:.1f} ms <= unmerged "
                    f"{1e3 * x['latency_unmerged_s']:.1f} ms",
                    x["latency_merged_s"] <= x["latency_unmerged_s"]))
    if "load" in r:
        out.append((f"load {r['load']['seconds']:.3f} s <= 2 x read {r['load']['read_seconds']:.3f} s",
                    r["load"]["seconds"] <= 2 * r["load"]["read_seconds"]))
    return out


def main(argv=None):
    cli.run_cli(lambda: run(parse_args(argv)), "bench.py", expected=(RuntimeError,))


if __name__ == "__main__":
    main()
