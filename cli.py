"""The conventions every command of this project shares, in one place, importable without torch.

- Errors: bad input ends in one line on stderr, `prog: error: what is wrong; the fix`, and exit
  code 2 (fail, ArgumentParser, run_cli); --help shows every default.
- Stop signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP end a command with one line and exit code
  128 + the signal number, the shell's convention; even while torch is still importing
  (exit_on_signals_while_importing); interrupts_deferred holds them back while files that belong
  together are renamed.
- Writes: a file is written in full under a temporary name, flushed to disk, then renamed into
  place (atomic_write, atomic_write_all), so a reader never sees half a file, nor a mix of two runs.
- Downloads: resumed, retried, verified (size, sha256) before a file gets its final name.
- Devices and precision: --device auto|cpu|cuda|mps, --precision auto|bf16|fp32 (torch is imported
  only inside those functions).

Usage, at the top of a script, before the slow imports:
    import cli
    if __name__ == "__main__":
        cli.exit_on_signals_while_importing("train.py")
    import torch
    ...
    cli.run_cli(main, "train.py")
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import re
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DownloadError(RuntimeError):
    """A file could not be fetched (no network, server error, an incomplete or corrupt transfer)."""


# ----------------------------------------------------------------------------------------------
# Errors and stop signals


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: …)" unless there is no default to show or the help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (exit code 2)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=_HelpFormatter, **kwargs)

    def error(self, message):
        fail(self.prog, f"{message} (see --help)")

    def _print_message(self, message, file=None):  # argparse's own swallows write errors: --help > /dev/full
        if message:
            (file or sys.stderr).write(message)


def fail(prog: str, message) -> None:
    """The one way a script stops on bad input: one line on stderr, exit code 2."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    _write_stderr(f"{prog}: error: {text}\n")
    sys.exit(2)


def _write_stderr(text: str):
    """stderr that never fails: characters its encoding lacks are escaped, a closed one is skipped."""
    try:
        sys.stderr.write(text.encode(sys.stderr.encoding or "utf-8", "backslashreplace")
                         .decode(sys.stderr.encoding or "utf-8"))
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


# Ctrl-C, `kill` / `timeout` / a container stop, and a closed terminal: each ends a command the same way
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when a stop signal arrives (a KeyboardInterrupt, as Ctrl-C is)."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's "killed by signal N": 130 for Ctrl-C, 143 for SIGTERM


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


def exit_on_signals_while_importing(prog: str, message="interrupted"):
    """Until run_cli takes over: a stop signal ends the process at once with one line.
    os._exit, not sys.exit: the imports of numpy and torch swallow a SystemExit raised inside them."""
    def handler(signum, _frame):
        _write_stderr(f"{prog}: {message}\n")
        os._exit(128 + signum)
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def run_cli(main, prog: str, expected=(), interrupted="interrupted",
            memory_tip="try a smaller --batch-size or model", finish_without_stdout=False):
    """Run main() as a command: a stop signal ends in one line and exit code 128 + its number, the
    expected errors and running out of memory in one line and exit code 2, a closed output pipe
    quietly (exit 0), any other output error (a full disk) in one line and exit code 2, and a
    character the output's encoding lacks is escaped (\\U0001f600), never a crash.

    interrupted: the message after a stop signal, or a function that returns it.
    finish_without_stdout: a failing stdout does not stop main() (a long training run goes on and
    saves its files); what happened is said on stderr at the end."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    stdout = sys.stdout
    guard = sys.stdout = _StdoutGuard(stdout) if finish_without_stdout and stdout else stdout
    try:
        try:
            main()
        finally:  # also after argparse's --help, which ends in SystemExit(0)
            if sys.stdout:  # None when the process was started with its stdout closed (>&-)
                sys.stdout.flush()  # a full disk behind stdout shows here, not in Python's shutdown
        for sig in STOP_SIGNALS:  # the work is done and its files are written: a late signal changes nothing
            signal.signal(sig, signal.SIG_IGN)
    except SystemExit as e:  # a finished --help, or fail()'s exit 2
        if e.code not in (0, None) or getattr(guard, "error", None) is None:
            raise  # else: a --help that could not be printed, said below
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        _say_stopped(prog, signum, interrupted() if callable(interrupted) else interrupted)
        sys.exit(128 + signum)
    except BrokenPipeError:  # e.g. piped into head
        _quiet_stdout()
        sys.exit(0)
    except (ValueError, OSError, DownloadError, *expected) as e:  # first: DownloadError is a RuntimeError
        _quiet_stdout()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = f" for {e.filename}" if e.filename else " (perhaps the disk behind stdout)"
            fail(prog, f"no space left on the device{where}; free some space and run the command again "
                       "(no earlier file was replaced)")
        fail(prog, e)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise  # a bug: keep its traceback
        fail(prog, f"out of memory ({str(e)[:80]}); {memory_tip}")
    finally:
        sys.stdout = stdout
    error = getattr(guard, "error", None)
    if error is not None:
        _write_stderr(f"{prog}: standard output failed ({error.strerror or error}); what it printed is lost, "
                      "but the command went on to the end (an adapter it trained is saved)\n")
        sys.exit(0 if isinstance(error, BrokenPipeError) else 2)


def _say_stopped(prog, signum, text):
    name = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    _write_stderr(f"\n{prog}: {text.replace('interrupted', 'interrupted' + name, 1)}\n")
    _quiet_stdout()


def _out_of_memory(error) -> bool:
    """torch's OutOfMemoryError (cuda's alone before torch 2.4), or the CPU allocator's "can't allocate"."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return isinstance(error, MemoryError) or (oom is not None and isinstance(error, oom)) or "allocate" in str(error)


class _StdoutGuard:
    """stdout that records its first write error (a closed pipe, a full disk) and then drops output."""

    def __init__(self, stream):
        self.stream, self.error = stream, None

    def write(self, text):
        if self.error is None:
            try:
                return self.stream.write(text)
            except OSError as e:
                self._failed(e)
        return len(text)

    def flush(self):
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as e:
                self._failed(e)

    def _failed(self, error):
        self.error = error
        _quiet_stdout()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _quiet_stdout():
    """Point stdout at /dev/null, so that Python's own flush at exit cannot fail a second time."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def interrupts_deferred():
    """Hold the stop signals back while the block runs (e.g. renames that must happen together); the
    list it yields holds the signals that came meanwhile, for the caller to act on afterwards."""
    caught = []
    if threading.current_thread() is not threading.main_thread():  # signals only ever reach the main thread
        yield caught
        return
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def listing(names, limit=6) -> str:
    """"a, b, c and 4 more": a short, sorted list of names for an error message."""
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------
# Writes that are never half done


def atomic_write(path, data) -> Path:
    """Write data (bytes, str, or a function that writes to a binary file) to path through a
    temporary file of a unique name, then rename it into place: path is never half-written, two
    writers never mix, and on any error nothing is replaced and no temporary file is left."""
    return atomic_write_all({path: data})[0]


def atomic_write_all(files: dict) -> list[Path]:
    """atomic_write for several files that belong together: every one is written in full and
    fsynced first (so a full disk or a denied permission replaces none of them, and a power cut
    after the renames cannot leave an empty file under a final name), then all are renamed in
    order, with the stop signals held back and the folders locked against another writer doing
    the same, and the folders are fsynced so that the renames last too."""
    temps = {Path(p): Path(p).with_name(f".{Path(p).name}.{os.getpid()}.{secrets.token_hex(4)}.tmp") for p in files}
    try:
        for tmp, data in zip(temps.values(), files.values()):
            with open(tmp, "xb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        folders = sorted({path.parent.resolve() for path in temps})
        with contextlib.ExitStack() as locks:
            for folder in folders:  # in a fixed order, so that two writers cannot wait on each other
                locks.enter_context(_locked(folder))  # waiting here, a stop signal still stops at once
            caught = locks.enter_context(interrupts_deferred())
            for path, tmp in temps.items():
                os.replace(tmp, path)
            for folder in folders:
                fsync_folder(folder)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    for signum in caught[:1]:  # a stop signal came during the renames, which all happened: act on it now
        signal.raise_signal(signum)
    return list(temps)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on the folder itself (flock), held by one writer at a time; it leaves no
    lock file behind. Where folders cannot be locked (not POSIX), writers go unlocked."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def fsync_folder(folder):
    """Make the renames in folder durable (as git and SQLite do); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# Downloads into a cache folder, every file verified before it gets its final name


CACHE_ENV = "GPT2_LORA_CACHE"


def default_cache_dir() -> Path:
    """$GPT2_LORA_CACHE, else $XDG_CACHE_HOME/gpt2-lora, else ~/.cache/gpt2-lora. A relative
    XDG_CACHE_HOME is ignored, as the XDG Base Directory spec says."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "gpt2-lora"
    home = Path("~").expanduser()
    if not home.is_absolute() or not home.is_dir():  # no usable HOME (a service account, a bare container)
        raise ValueError(f"there is no usable home folder for the download cache (HOME is {str(home)!r}); "
                         f"pass --cache-dir DIR or set {CACHE_ENV}")
    return home / ".cache" / "gpt2-lora"


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _announced_sha256(response) -> str | None:
    """The sha256 that the Hugging Face hub announces for a large (LFS) file, if it does."""
    for r in (*response.history, response):  # the hub says it on the first answer, before redirecting
        etag = r.headers.get("X-Linked-Etag", "").strip('"').removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return etag
    return None


def _fetch(url, part: Path, timeout, progress) -> tuple[int | None, str | None]:
    """Append url's bytes to part (resuming with a Range request); return (total size or None,
    announced sha256 or None). Raises DownloadError when the server refuses."""
    import requests  # here, not at the top: it adds 0.15 s to every start of predict.py, which never downloads

    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left to send: the part is complete, or no prefix of this file
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == done:
                return done, _announced_sha256(r)  # complete (a kill during its check): verify it as it is
            part.unlink()
            raise requests.ConnectionError("the server refused to resume")
        if r.status_code in (429, 500, 502, 503, 504):  # busy or failing for now: worth another try
            raise requests.ConnectionError(f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400:
            raise DownloadError(f"could not download {url}: HTTP {r.status_code} {r.reason}")
        if r.status_code == 206:  # Content-Range: bytes start-end/total
            total, mode = int(r.headers["Content-Range"].rsplit("/", 1)[1]), "ab"
        else:  # 200: the server sends the whole file, whatever we asked for
            length = r.headers.get("Content-Length")
            total, done, mode = (int(length) if length else None), 0, "wb"
        started, shown, start_bytes = time.monotonic(), 0.0, done
        with open(part, mode) as f:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                done += len(chunk)
                now = time.monotonic()
                if progress and (now - shown > 0.5 or done == total):
                    shown, rate = now, (done - start_bytes) / 1e6 / max(now - started, 1e-6)
                    of_total = f" / {total / 1e6:,.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
                    print(f"\r  {part.name.removesuffix('.part')}: {done / 1e6:,.1f}{of_total} {rate:.1f} MB/s",
                          end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        chunked = "chunked" in r.headers.get("Transfer-Encoding", "")  # requests raises on a cut chunked body
        return (total if total is not None or not chunked else part.stat().st_size), _announced_sha256(r)


def download_file(url: str, dest, sha256=None, check=None, retries=3, timeout=(10, 60), backoff=2.0,
                  progress=True) -> Path:
    """Stream url to dest through dest.part, resuming a partial file; verify; then rename into place.

    dest appears only once the whole file is there: with the size the server announced, the sha256
    given (or announced by the hub), and passing check(path) (which raises ValueError when the bytes
    are wrong). A transfer whose end cannot be known (no Content-Length) must be checked by sha256.
    A host that cannot be reached at all (no network) fails at once, without retries.
    """
    dest = Path(dest)
    made = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # to remove again on failure
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download(url, dest, sha256, check, retries, timeout, backoff, progress)
    finally:
        for folder in made:  # deepest first; only those still empty: a failed download leaves no folders
            with contextlib.suppress(OSError):
                folder.rmdir()


def fetch_all(*fetches) -> list:
    """Call each function (each may download something) and return their results; when downloads
    fail, every one is tried first and one DownloadError names them all (offline, a user learns in one
    run everything to pass instead)."""
    results, failed = [], []
    for fetch in fetches:
        try:
            results.append(fetch())
        except DownloadError as e:
            failed.append(str(e).rstrip("."))
    if failed:
        raise DownloadError(". Also, ".join(failed) if len(failed) > 1 else failed[0])
    return results


def _unreachable(error) -> bool:
    """Whether a connection error says the host is not there at all (no such name, nothing listening,
    no network): trying again in a few seconds would not help."""
    text = repr(error)
    return any(s in text for s in ("NameResolutionError", "Failed to resolve", "Name or service not known",
                                   "nodename nor servname", "Temporary failure in name resolution",
                                   "Connection refused", "Network is unreachable", "No route to host"))


def _download(url, dest: Path, sha256, check, retries, timeout, backoff, progress) -> Path:
    import requests

    part, error = dest.with_name(dest.name + ".part"), None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * attempt)
        try:
            total, announced = _fetch(url, part, timeout, progress)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if _unreachable(e):  # offline: say so at once instead of retrying for seconds
                raise DownloadError(f"could not download {url}: the host cannot be reached (no network?)") from None
            error = str(e) if "refused to resume" in str(e) or "HTTP" in str(e) else type(e).__name__
            continue
        size, expected = part.stat().st_size, sha256 or announced
        if total is not None and size != total:
            error = f"got {size:,} of {total:,} bytes"
            continue
        try:
            if total is None and expected is None and check is None:
                raise ValueError("the server did not say how long the file is, so a cut transfer cannot be told apart")
            if expected and sha256_of(part) != expected:
                raise ValueError(f"its sha256 is not the expected {expected[:16]}…")
            if check:
                check(part)
        except ValueError as e:
            part.unlink(missing_ok=True)  # never resume from bad bytes
            raise DownloadError(f"{url} arrived corrupt ({e}); nothing was kept: run the command again") from None
        with open(part, "rb+") as f:  # on disk before it gets its final name (see atomic_write_all)
            os.fsync(f.fileno())
        os.replace(part, dest)
        fsync_folder(dest.parent)
        return dest
    raise DownloadError(f"could not download {url} after {retries} tries ({error})")


# ----------------------------------------------------------------------------------------------
# Devices and precision (torch is imported here, not above, so that the rest needs no torch)


DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def available_devices() -> list[str]:
    import torch

    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names + (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])


def pick_device(name="auto") -> torch.device:
    """auto: CUDA if present, then Apple's MPS, then the CPU; any other name must be usable here."""
    import torch

    usable = available_devices()
    if name == "auto":
        return torch.device("cuda" if "cuda:0" in usable else "mps" if "mps" in usable else "cpu")
    try:
        device = torch.device(name)
        key = device.type if device.type in ("cpu", "mps") else f"{device.type}:{device.index or 0}"
    except (RuntimeError, ValueError):
        key = None
    if key not in usable:
        raise ValueError(f"device {name!r} cannot be used by this torch; available: {', '.join(['auto', *usable])}")
    return device


BF16_MIN_SPEEDUP = 1.5  # on a CPU, bf16 only where a matmul measures at least this much faster
PRECISION_HELP = ("auto (CUDA: bf16 where the GPU supports it; CPU: bf16 only where a short probe measures a bf16 "
                  f"matmul at least {BF16_MIN_SPEEDUP}x faster than fp32; otherwise fp32), bf16 or fp32")


def bf16_speedup(device, m=256, k=768, n=3072, runs=3) -> float:
    """How many times faster a bf16 (m, k) @ (k, n) matmul runs than a float32 one: model-like
    shapes, best of runs after a warm-up (noise only ever slows a run). About 0.1 s on a CPU."""
    import torch

    generator = torch.Generator(device).manual_seed(0)  # its own: the probe never moves the global seed

    def best(dtype):
        a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
        times = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            (a @ b).sum().item()  # .item() waits for the device to finish
            times.append(time.perf_counter() - start)
        return min(times[1:])
    return best(torch.float32) / best(torch.bfloat16)


def choose_precision(requested: str, device: torch.device, speedup=bf16_speedup) -> tuple[str, str]:
    """("fp32" or "bf16", why). auto: bf16 on a GPU that has it; on a CPU only where a short
    measurement shows bf16 at least BF16_MIN_SPEEDUP times faster (some CPUs run it 4-5x faster, others
    2x slower)."""
    import torch

    if requested in ("fp32", "bf16"):
        return requested, "as asked"
    if device.type == "cuda":
        return ("bf16", "this GPU supports it") if torch.cuda.is_bf16_supported() else ("fp32", "this GPU lacks bf16")
    if device.type != "cpu":
        return "fp32", f"bf16 is not measured on {device.type}"
    ratio = speedup(device)
    if ratio >= BF16_MIN_SPEEDUP:
        return "bf16", f"a bf16 matmul runs {ratio:.1f}x faster than fp32 here"
    return "fp32", f"a bf16 matmul runs only {ratio:.2f}x as fast as fp32 here"


def autocast_for(device: torch.device, precision: str):
    """bf16: matmuls in bfloat16 (the float32 LoRA and head weights are cast on the fly, their
    master copies and AdamW's state stay float32); fp32: nothing changes."""
    if precision == "bf16":
        import torch

        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

