"""How a run survives: the one-line error, the output folder and its lock, atomic
checkpoints and what a resume must agree with, RNG state, signals and the stop request,
the metrics file, and the process group under torchrun. Nothing here knows about masking
or saliency: train.py's loop uses it, and so do evaluate.py, bench.py and study.py.

    >>> import runs
    >>> with runs.out_folder("runs/x"), runs.StopRequest() as stop:    # locked; Ctrl-C asks to stop
    ...     runs.save_checkpoint("runs/x/last.pt", {"args": {}, "model": {}, "step": 1})   # atomic
    >>> runs.read_checkpoint("runs/x/last.pt")                          # or CheckpointError, one line
"""
import argparse
import atexit
import contextlib
import fcntl
import inspect
import json
import multiprocessing.util
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed

from models import average_running_stats, process_group


# ----------------------------------------------------------------------------- errors and files

def fail(message):
    """A user-facing error: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_script(main):
    """An entry script's `main()`. Ctrl-C where no run is there to save (parsing flags,
    generating or downloading data, evaluating) ends in one line with exit status 130, not a
    KeyboardInterrupt traceback; a run's own Ctrl-C (runs.StopRequest) saves first. Each
    script's first lines let Ctrl-C end it quietly while torch is still being imported."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)


class OneLineParser(argparse.ArgumentParser):
    """argparse that answers a bad flag in one line (exit 2) instead of the whole usage."""

    def error(self, message):
        fail(f"{message} (see python {self.prog} --help)")


def write_atomic(path, write, mode="wb"):
    """Write `path` through `write(file)`, atomically: into PATH.tmp, then renamed over PATH,
    so a reader sees the old file or the new one. A write that fails or is interrupted
    removes PATH.tmp and raises. Through a Python file object, so that a full disk raises
    OSError "No space left on device" (torch.save given a path says "[enforce fail at
    inline_container.cc]")."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path, value, indent=2):
    """Write `value` as JSON to `path` atomically: a reader sees the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: json.dump(value, f, indent=indent), mode="w")


def can_write(path):
    """Whether `path` can be written (its folder, or the nearest folder above that exists, is
    writable): checked before a long job, not after it."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=folder):                # a try, not permission bits (root, read-only mounts)
            pass
    except OSError:
        return False
    return not os.path.isdir(path)


def code_commit():
    """The project's commit, `-dirty` when a Python file or the requirements differ from it
    (results files do not count); "unknown" outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "*.py", "requirements.txt"],
                                 cwd=here, capture_output=True).returncode
        return head + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- checkpoints

# Checkpoints are read with weights_only=True: tensors, numbers, strings, containers, and these
# numpy globals, which rebuild an array's data and nothing else (checkpoints written before
# numpy's random state was saved as a tensor hold it as an array). Nothing a file names runs.
NUMPY_ARRAYS = [(np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct, np.ndarray, np.dtype,
                type(np.dtype(np.uint32))]                            # numpy 2 moved its core to _core


class CheckpointError(Exception):
    """A checkpoint that is missing or unreadable; the message names the fix."""


def read_checkpoint(path, flag="--checkpoint", *, mmap=False, needs=("framework", "arch", "stem")):
    """The checkpoint dict, or CheckpointError with a one-line message. `mmap`: tensors stay
    on disk until read (a cheap look at the flags). `needs`: flags its 'args' must hold (a
    dict with 'args' and 'model' and no flags was a traceback further on)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag} {path}: no such file; pass the last.pt that train.py wrote")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:                           # weights_only met a global: never run it
        if "GLOBAL" not in str(error):                                # junk bytes, not a named callable
            raise CheckpointError(f"{flag} {path}: unreadable (UnpicklingError); it may be truncated: "
                                  f"use another checkpoint") from None
        raise CheckpointError(f"{flag} {path}: names code to run when loaded (a pickled object, not tensors and "
                              f"plain values), so it is not read: use a checkpoint that train.py wrote") from None
    except Exception as error:
        raise CheckpointError(f"{flag} {path}: unreadable ({type(error).__name__}); it may be truncated: "
                              f"use another checkpoint") from None
    if not isinstance(checkpoint, dict) or not {"args", "model"} <= set(checkpoint):
        raise CheckpointError(f"{flag} {path}: not a train.py checkpoint (it has no 'args' and 'model')")
    missing = [name for name in needs if name not in (checkpoint["args"] if isinstance(checkpoint["args"], dict) else {})]
    if missing:
        raise CheckpointError(f"{flag} {path}: not a train.py checkpoint (its 'args' lack --{missing[0].replace('_', '-')})")
    return checkpoint


def load_checkpoint(path, flag="--checkpoint"):
    """The checkpoint dict; a missing or unreadable file fails with one line."""
    try:
        return read_checkpoint(path, flag)
    except CheckpointError as error:
        fail(error)


def finite_weights(model):
    """Whether every floating-point parameter and buffer of `model` is finite (one host sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def save_checkpoint(path, state):
    """Atomic: a half-written file never replaces a good one. A write that fails (a full disk,
    a folder that went away) or is interrupted removes its temporary file; a failure stops the
    run in one line (exit 1), with the previous checkpoint as it was."""
    try:
        write_atomic(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as error:                          # a signal, a SystemExit: passed on
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        print(f"error: could not write {path} ({reason}); the previous checkpoint is as it was: make room "
              f"(or fix the folder) and continue with --resume auto", file=sys.stderr)
        sys.exit(1)


def rng_state():
    """Every random stream, as what `torch.load(weights_only=True)` reads: tensors, numbers,
    tuples (numpy's Mersenne Twister keys as a tensor, not an array)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                       "has_gauss": has_gauss, "cached_gaussian": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = (saved["name"], saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
                 saved["cached_gaussian"])
    np.random.set_state(saved)                                        # a tuple: a checkpoint from before
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed):
    """Seed torch, numpy and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# Flags that say where and how a run runs, not what it computes: a resumed run may change them.
FREE_ON_RESUME = ("resume", "out", "device", "amp", "channels_last", "compile", "workers", "log_every",
                  "knn_every", "save_every", "max_steps", "data_dir", "download", "shapes_cache")


def resume_checkpoint(args):
    """The checkpoint to continue from (None: a fresh start). Under torchrun process 0's
    --resume (its `auto` decision) holds for every process, and every process must read that
    file at the same step, or they all stop with one line: on nodes without a shared --out
    the others would start from step 0 with other weights."""
    rank, world = process_group()
    if world > 1:
        decision = [args.resume]
        torch.distributed.broadcast_object_list(decision, 0)
        args.resume = decision[0]
    if not args.resume:
        return None
    try:
        checkpoint, problem = read_checkpoint(args.resume, "--resume"), None
        lacking = [key for key in ("optimizer", "scheduler", "scaler", "epoch", "step", "rng") if key not in checkpoint]
        if lacking:
            raise CheckpointError(f"--resume {args.resume}: has no '{lacking[0]}' to continue from: pass a last.pt "
                                  f"that train.py wrote (evaluate.py reads weights alone)")
    except CheckpointError as error:
        checkpoint, problem = None, str(error)
    if world > 1:
        seen = [None] * world
        torch.distributed.all_gather_object(seen, (problem, checkpoint and checkpoint["step"]))
        bad = [r for r, (trouble, step) in enumerate(seen) if trouble or step != seen[0][1]]
        if bad:
            if rank != 0:
                sys.exit(2)
            fail(f"process {bad[0]} {'cannot read' if seen[bad[0]][0] else 'reads another step in'} "
                          f"{args.resume}, which process 0 resumes from: give every process the same --out, on a "
                          f"file system they share")
    if problem:
        fail(problem)
    return checkpoint


def check_resume(args, checkpoint):
    """A resumed run is the run that was started: every other flag must be the same (flags
    that a checkpoint predates are not compared)."""
    for flag, saved in checkpoint["args"].items():                    # in the order of --help
        if flag in FREE_ON_RESUME or not hasattr(args, flag) or saved == getattr(args, flag):
            continue
        show = lambda value: " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        fail(f"--resume {args.resume} was trained with --{flag.replace('_', '-')} {show(saved)}, "
                      f"not {show(getattr(args, flag))}: resume with the same flags, or start another --out")
    return checkpoint


def stop_not_finite(out, step, what):
    """Exit 1 without saving: a run whose loss or weights are NaN or inf."""
    last_pt = os.path.join(out, "last.pt")
    kept = f"the last good checkpoint {last_pt} is kept" if os.path.exists(last_pt) else "no checkpoint was written"
    print(f"error: {what} not finite at step {step}; stopped, {kept} (try a lower --lr or --amp off)",
          file=sys.stderr)
    sys.exit(1)


def save_run(path, args, parts, epoch, step, knn_before, minutes=0.0):
    """Write a run's state to `path`, atomically: weights, optimizer, lr schedule, grad
    scaler, position, the minutes trained so far, and every process's random streams (under
    torchrun all of them call this; process 0 writes). Non-finite weights are never written:
    they stop the run (exit 1)."""
    rank, world = process_group()
    if not finite_weights(parts.model):
        stop_not_finite(args.out, step, "the weights are")
    average_running_stats(parts.model)                # what one process with the whole batch holds
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng_state())
    if rank == 0:
        save_checkpoint(path, {
            "args": vars(args), "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(), "epoch": epoch,
            "step": step, "rng": rngs[0], "rng_per_process": rngs, "knn_random_init": knn_before,
            "minutes": minutes})


def restore_run(checkpoint, parts, seed, say=print):
    """Load what `save_run` wrote into `parts`; each process continues its own random streams
    (another number of processes: the same batches, new augmentation draws). Returns
    `(epoch, step, kNN of the random-init encoder)`."""
    rank, world = process_group()
    for name in ("model", "optimizer", "scheduler", "scaler"):
        getattr(parts, name).load_state_dict(checkpoint[name])
    rngs = checkpoint.get("rng_per_process", [checkpoint["rng"]])
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    else:
        torch.manual_seed(seed + rank + 1000 * checkpoint["step"])
        say(f"the checkpoint was written by {len(rngs)} processes, this run has {world}: the batches are the "
            f"same, the augmentation draws are new")
    return checkpoint["epoch"], checkpoint["step"], checkpoint.get("knn_random_init")


# ----------------------------------------------------------------------------- signals and processes

class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption) ask the run to stop: the step (or
    kNN pass) in flight finishes, train() checkpoints and exits with 128 + the signal's number.
    A second signal stops at once, unsaved, but only when it is a new request: one stop often
    arrives twice (`timeout` forwards its TERM to a process group that got one too, torchrun
    forwards to its children what the terminal sent them), so a signal within DUPLICATE_S of
    the first (10 s for TERM, which must always save; 1 s for Ctrl-C) is the same request."""
    DUPLICATE_S = {signal.SIGTERM: 10.0, signal.SIGINT: 1.0}

    def __init__(self, quiet=False):
        self.signum, self.previous, self.quiet = None, {}, quiet           # quiet: processes other than 0
        self.first_at = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is not None:
            if now - self.first_at < self.DUPLICATE_S.get(signum, 0.0):
                return                                                # the same stop, delivered twice
            print(f"{signal.Signals(signum).name} again: stopping at once", file=sys.stderr, flush=True)
            sys.exit(128 + signum)
        self.signum, self.first_at = signum, now
        if not self.quiet:
            print(f"{signal.Signals(signum).name}: finishing the step in flight, then saving "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id):
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly: a
    cluster's preemption signals every process of the job, and a worker that died of it
    would take the main process down before it could save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register            # runs before multiprocessing's own exit handler, registered at its import
def end_loader_workers():
    """At exit, end the loader workers that are still alive with SIGKILL. Python ends daemonic
    children with SIGTERM, which ours ignore, and then waits for them: a loader that an error
    left running (its iterator held by the traceback) hung the process after its one-line error.
    The loader's SIGCHLD handler would report these deaths as a crash: it goes first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
        child.join()


class Agreement:
    """Under torchrun the processes agree, after every step, on whether to stop or to save:
    a signal reaches each one at its own moment, and --save-every reads each one's clock.
    `agree(signum, save_now)` returns what any process asked for; one process: itself."""

    def __init__(self, world):
        self.world = world
        self.group = torch.distributed.new_group(backend="gloo") if world > 1 else None

    def __call__(self, signum, save_now):
        if self.world == 1:
            return signum, save_now
        flags = torch.tensor([signum or 0, int(save_now)])
        torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])


def start_processes(args):
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the process group: NCCL with one
    GPU per process (LOCAL_RANK), gloo on CPUs. `python train.py` takes no distributed path."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if args.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            fail(f"process {local_rank} of this node has no GPU ({torch.cuda.device_count()} visible): "
                          f"start at most that many with torchrun --nproc_per_node")
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def distributed(step_fn, device):
    """Under torchrun, the framework in DistributedDataParallel (gradients averaged over the
    processes; each keeps its own BatchNorm statistics until `models.average_running_stats`);
    with one process, itself."""
    if process_group()[1] == 1:
        return step_fn
    for tensor in [*step_fn.parameters(), *step_fn.buffers()]:        # the same start everywhere, the queue too
        torch.distributed.broadcast(tensor.data, 0)
    ddp = torch.nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(step_fn, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


# ----------------------------------------------------------------------------- the output folder

def lock_out_folder(out):
    """Hold OUT/train.lock for the run's life: an OS lock (fcntl.flock) that the kernel drops
    when the process ends, however it ends, so a dead run's lock is free whatever its file
    says (a requeued job in a container may find its old PID alive as another process), and
    two live runs never both hold it. The file names its holder (pid and host) for the
    message. A live holder: one line, exit 2. Returns the function that releases it."""
    path = os.path.join(out, "train.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "starting"
            os.close(fd)
            fail(f"--out {out}: another run ({holder}) is writing there; wait for it to end or pick "
                          f"another --out")
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:          # not a file its last holder removed meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())

    def release():
        with contextlib.suppress(OSError):
            os.remove(path)                                           # while still held: see the inode check above
        os.close(fd)
    return release


@contextlib.contextmanager
def out_folder(out):
    """The output folder, made and locked for this run (one line when it cannot be written).
    A folder this run made and left empty (a refusal before the first write) is removed."""
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        release = lock_out_folder(out)
    except OSError as error:
        fail(f"--out {out}: cannot write there ({error.strerror or error}); pick another --out")
    try:
        yield
    finally:
        release()
        if made and not os.listdir(out):
            os.rmdir(out)


def open_metrics(path, checkpoint):
    """metrics.jsonl for appending. A resumed run first drops the records written after its
    checkpoint (a killed run logs steps that the resumed run repeats); a fresh run starts it anew."""
    kept, damaged = [], 0
    if checkpoint and os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    step = record.get("step", 0)
                except (ValueError, AttributeError):                  # cut short by a kill or a full disk, blank
                    damaged += 1
                    continue
                if step <= checkpoint["step"]:
                    kept.append(line if line.endswith("\n") else line + "\n")
    if damaged:
        print(f"note: {path}: {damaged} damaged or blank line(s) dropped (a write cut short by a kill or a "
              f"full disk); the {len(kept)} complete records up to the checkpoint are kept", file=sys.stderr)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


class SplitTimer:
    """Seconds spent in each part of the steps of an epoch. On a GPU the marks are CUDA events,
    read once at the end of the epoch, so timing the parts costs no synchronisation."""

    def __init__(self, device):
        self.cuda, self.events = device.type == "cuda", []
        self.seconds = {"data": 0.0, "saliency+masking": 0.0, "model": 0.0}

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name, start, end):
        if self.cuda:
            self.events.append((name, start, end))
        else:
            self.seconds[name] += end - start

    def totals(self):
        if self.events:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1000
            self.events.clear()
        return self.seconds
