"""Pre-train a ResNet with saliency-guided masking and masked hard negatives, on one device
or, under torchrun, on several.

    python train.py                                  # shapes, MoCo v2 + the method, 6-11 min on 2 CPU cores
    python train.py --dataset cifar10 --data-dir data --download --epochs 200
    python train.py --masking none                   # the plain MoCo v2 baseline
    python train.py --resume runs/shapes-moco/last.pt
    torchrun --nproc_per_node 8 train.py --dataset imagefolder ...   # several GPUs (or nodes)

Per step (`train_step`): two augmented views -> saliency of each (`saliency.Saliency`) -> the
query masked in proportion between foreground and background (`masking.balanced_mask`) -> M
hard negatives from the key with most of its salient patches masked -> the framework's loss
(`models`, SPEC.md sections 2-4). The flags and their recipes are in config.py; how a run
survives (its folder, lock, checkpoints, signals, processes) in runs.py.
Writes OUT/metrics.jsonl, OUT/views_epochN.png and OUT/last.pt (atomically, every epoch).
"""
import signal
if __name__ == "__main__":                # Ctrl-C while torch is imported: stop quietly, nothing is written yet
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed

import config
import data
import evaluate
import masking
import models
import runs
import saliency

# ----------------------------------------------------------------------------- one step

def make_views(args, batch, parts):
    """Saliency, masking and hard negatives for one batch (SPEC.md sections 2-3), no grad.

    `batch`: the loader's tensors, on the device. Returns query [B,3,H,W], key [B,3,H,W], hard
    negatives [B,M,3,H,W] or None, the keys when they are already encoded (MoCo with
    `--saliency self`; else None), and the figures to log (foreground ratio, masked fraction)
    plus what the PNG grid shows.
    """
    augment, sal, masker, model = parts.augment, parts.sal, parts.masker, parts.model
    view1, view2, mask1, mask2, _ = batch                             # on the device
    if augment is not None:                                           # batched, split: uint8 in
        (view1, mask1), (view2, mask2) = augment(view1, mask1 if mask1.numel() else None), \
            augment(view2, mask2 if mask2.numel() else None)
    if args.masking == "none":                                        # the filter alone, when asked for
        return masker.filter(view1), masker.filter(view2), None, None, {"view1": view1}
    key, keys, fg_k = masker.filter(view2), None, None
    self_saliency = args.saliency == "self"        # the encoder's own maps: feed it what it trains on
    if self_saliency and args.num_hard_negatives and isinstance(model, models.MoCo):
        with parts.autocast():                     # the key pass also gives the key's saliency
            keys = model.encode_keys(key)
        fg_k = sal.from_map(saliency.scda_saliency(keys[1].float()))
    seen = masker.filter(view1)                                        # what the encoders see

    def foreground(view, filtered_view, masks):
        if not self_saliency:
            return sal(view, masks=masks)
        # The pass normalises with its batch's statistics, as the key pass does, but leaves the
        # running statistics to the step's own passes.
        with models.batch_stats_only(model.saliency_encoder):
            return sal(filtered_view, encoder=model.saliency_encoder)
    fg_q = None
    if args.masking == "saliency":
        fg_q = foreground(view1, seen, mask1)
    query, query_mask = masker(seen, fg_q, "positive", filtered=True)
    figures = {"masked_fraction": query_mask.float().mean(), "query_mask": query_mask, "view1": view1, "fg": fg_q}
    negatives = None
    if args.num_hard_negatives:
        if fg_k is None:
            fg_k = foreground(view2, key, mask2)
        negatives = torch.stack([masker(key, fg_k, "negative", filtered=True)[0]
                                 for _ in range(args.num_hard_negatives)], 1)
        figures["fg_ratio"] = (fg_q.float().mean() + fg_k.float().mean()) / 2
    elif fg_q is not None:
        figures["fg_ratio"] = fg_q.float().mean()
    return query, key, negatives, keys, figures


def build(args, steps_per_epoch):
    """What a training step needs, from the flags: model, optimizer, lr schedule (linear
    warm-up, then cosine), grad scaler, autocast, augmentation, saliency and masker.
    bench.py times the same objects. The cosine steps with every optimizer step; the release
    (MoCo's `adjust_learning_rate`) steps once per epoch, which differs by at most one epoch's
    worth of decay and matters only for runs of a few epochs."""
    device = torch.device(args.device)
    model = models.build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch                       # the lr schedule's length
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay_steps) / decay_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True                         # fixed shapes: time the conv algorithms once
    compiler = compile_with(args.compile)
    return argparse.Namespace(
        device=device, model=model, optimizer=optimizer, total_steps=total_steps,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
        step_fn=compiler(runs.distributed(model, device)), views_fn=compiler(make_views),
        autocast=lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        augment=None if args.augment == "torchvision" else data.BatchedMoCoV2(
            args.image_size, tuple(args.crop_scale), geometry=args.augment == "batched"),
        sal=saliency.Saliency(args.saliency, args.grid, weights=args.saliency_weights,
                              std_factor=args.fg_std_factor).to(device),
        masker=masking.Masker(args.strategy, args.grid, high_pass=args.high_pass == "on",
                              positive_ratio=tuple(args.mask_ratio),
                              negative_ratio=tuple(args.hard_negative_ratio)))


def compile_with(mode):
    """`torch.compile` in `mode` (train.py's `--compile`), or nothing for 'off'. The step
    compiles two pieces: the framework's forward (its backward follows) and `make_views`.
    The optimizer stays eager. Compiled random draws come from inductor's own generator,
    seeded from torch's: the same distributions, other numbers than eager."""
    if mode in (None, "off"):
        return lambda fn: fn
    return lambda fn: torch.compile(fn, mode=None if mode == "default" else mode)


def train_step(args, batch, parts, timer=None):
    """One optimizer step on `batch`: views, then the framework's loss, backward, SGD, lr.
    Returns the loss (a tensor: no sync), the figures and the views. `timer`: a SplitTimer
    that gets the time of saliency+masking and of the model step."""
    start = timer.mark() if timer else None
    batch = [t.to(parts.device, non_blocking=True) for t in batch]
    with torch.no_grad():
        query, key, negatives, keys, figures = parts.views_fn(args, batch, parts)
    middle = timer.mark() if timer else None
    if args.channels_last:
        query, key = (x.contiguous(memory_format=torch.channels_last) for x in (query, key))
    if isinstance(parts.model, models.BYOL):          # the target's momentum rises to 1 by a cosine
        parts.model.momentum = models.cosine_momentum(args.moco_momentum, parts.scheduler.last_epoch,
                                                      parts.total_steps)
    with parts.autocast():
        loss, model_figures = parts.step_fn(query, key, negatives, **({"keys": keys} if keys is not None else {}))
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    if timer:
        end = timer.mark()
        timer.add("saliency+masking", start, middle)
        timer.add("model", middle, end)
    return loss, {**figures, **model_figures}, (query, key, negatives)


# ----------------------------------------------------------------------------- the run

def train(args):
    runs.seed_all(args.seed)
    checkpoint = runs.resume_checkpoint(args)
    train_set = data.pretrain_dataset(args.dataset, args.data_dir, args.image_size, download=args.download,
                                      augment=args.augment, crop_scale=tuple(args.crop_scale),
                                      shapes_size=tuple(args.shapes_size),
                                      object_scale=tuple(args.shapes_object_scale), shapes_twins=args.shapes_twins,
                                      shapes_cache=args.shapes_cache)
    if args.subset:
        train_set = torch.utils.data.Subset(train_set, range(min(args.subset, len(train_set))))
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        runs.fail(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images, so "
                  f"an epoch has no step: use a smaller batch (or more images)")
    if args.framework == "moco" and args.queue_size > len(train_set):   # its own keys would be its negatives
        most = len(train_set) // args.batch_size * args.batch_size
        if args.queue_size != config.recipe_of(args)["queue_size"]:    # asked for: refused
            runs.fail(f"--queue-size {args.queue_size} is larger than the {len(train_set)} training images, so each "
                      f"image's own earlier keys would be among its negatives: use --queue-size {most} or less")
        if models.process_group()[0] == 0:
            print(f"note: the recipe's queue of {args.queue_size} keys is longer than the {len(train_set)} training "
                  f"images; it holds {most} (the most whole batches that fit)")
        args.queue_size = most                                          # the same cap on every resume
    if checkpoint:                                                     # after the cap, which it saw too
        runs.check_resume(args, checkpoint)
    first = models.process_group()[0] == 0                            # process 0 writes, the others compute
    with runs.out_folder(args.out) if first else contextlib.nullcontext(), runs.StopRequest(quiet=not first) as stop:
        return run(args, checkpoint, train_set, steps_per_epoch, stop)


def run(args, checkpoint, train_set, steps_per_epoch, stop):
    """The training loop: epochs of steps, logs, checkpoints (at epoch ends, every
    --save-every minutes, and on a stop request), then the final kNN."""
    parts = build(args, steps_per_epoch)                               # the same model in every process
    rank, world = models.process_group()
    if world > 1:                                                      # then each draws its own views
        runs.seed_all(args.seed + rank)
    state = Run(args, parts, steps_per_epoch, stop)
    state.restore(checkpoint)
    if checkpoint and state.step >= state.stop_at:                   # a finished run: its final record stands
        state.say(f"{args.resume} is at step {state.step} of {state.stop_at}: the run is finished, nothing to do "
                  f"(its figures are in {os.path.join(args.out, 'metrics.jsonl')})")
        return {"step": state.step}
    state.begin(len(train_set))
    while state.epoch < args.epochs and not state.done:
        figures, views = state.train_epoch(train_set)
        state.end_epoch(figures, views)
    return state.finish()


class Run:
    """A run's position (epoch, step) and its bookkeeping around the steps: progress lines and
    metrics.jsonl, checkpoints, stop requests agreed between processes, the kNN monitor.
    Process 0 prints and writes; under torchrun the others compute along."""

    def __init__(self, args, parts, steps_per_epoch, stop):
        self.args, self.parts, self.steps_per_epoch, self.stop = args, parts, steps_per_epoch, stop
        self.rank, self.world = models.process_group()
        self.say = print if self.rank == 0 else (lambda *a, **k: None)
        self.stop_at = min(parts.total_steps, args.max_steps or parts.total_steps)   # --max-steps: a kill
        self.last_pt = os.path.join(args.out, "last.pt")
        self.epoch, self.step, self.knn_before, self.metrics = 0, 0, None, None
        self.minutes_before = 0.0                                     # trained by the processes a resume continues

    def restore(self, checkpoint):
        """Continue from `checkpoint` (None: a fresh start)."""
        self.checkpoint = checkpoint
        if checkpoint:
            self.epoch, self.step, self.knn_before = runs.restore_run(checkpoint, self.parts, self.args.seed, self.say)
            self.minutes_before = checkpoint.get("minutes", 0.0)
            self.say(f"resumed {self.args.resume}: epoch {self.epoch}, step {self.step}")

    def begin(self, num_images):
        """The random-init kNN (once per run), args.json, the metrics file, the first line."""
        args = self.args
        if self.knn_before is None:
            self.knn_before = knn(args, self.parts.model, self.parts.masker, self.parts.device)   # None off process 0
            if self.rank == 0:
                print(f"kNN top-1 of the random-init encoder: {self.knn_before:.2f} %")
        if self.rank == 0:
            with open(os.path.join(args.out, "args.json"), "w") as f:
                json.dump({**vars(args), "world_size": self.world}, f, indent=2)
            self.metrics = runs.open_metrics(os.path.join(args.out, "metrics.jsonl"), self.checkpoint)
        self.agree = runs.Agreement(self.world)
        self.say(f"{args.framework} {args.arch} on {args.dataset} ({num_images} images, {args.image_size} px), "
                 f"masking {args.masking}/{args.saliency}/{args.strategy}, M={args.num_hard_negatives}, "
                 f"{self.steps_per_epoch} steps/epoch, {args.epochs} epochs, batch {args.batch_size}"
                 f"{f' on {self.world} processes' if self.world > 1 else ''}, {self.parts.device}; out {args.out}")
        self.start_time, self.last_log, self.last_save = time.time(), 0.0, time.time()
        self.done, self.unchecked = self.step >= self.stop_at, None
        signum, _ = self.agree(self.stop.signum, False)
        if signum:                                                    # a signal during the first kNN
            self.stop_here(signum)

    def train_epoch(self, train_set):
        """The steps of one epoch, from the run's position. Returns the last step's figures
        and views, for the epoch's picture."""
        args, parts = self.args, self.parts
        timer, figures, views = runs.SplitTimer(parts.device), None, None
        self.epoch_start = tick = time.perf_counter()
        self.epoch_first_step = self.step
        for batch in self.loader(train_set):
            timer.seconds["data"] += time.perf_counter() - tick          # host time waiting for the loader
            loss, figures, views = train_step(args, batch, parts, timer)
            self.step += 1
            # The loss of the step before is checked once this step is queued: the check waits for
            # the GPU without leaving it idle. A bad step stops the run before any checkpoint.
            if self.unchecked:
                stop_if_not_finite(args, *self.unchecked)
            self.unchecked = (self.step, loss)
            if self.step == 1 or time.time() - self.last_log >= args.log_every or self.step == self.stop_at:
                self.log_step(loss, figures)
            if self.step >= self.stop_at:
                self.done = True
                break
            save_every = args.save_every and time.time() - self.last_save >= 60 * args.save_every
            signum, save_now = self.agree(self.stop.signum, save_every)
            if signum or save_now:
                stop_if_not_finite(args, *self.unchecked)             # never checkpoint a bad step
                if signum:
                    self.stop_here(signum)
                self.save()                                           # inside the epoch: its position too
            tick = time.perf_counter()
        if self.unchecked:
            stop_if_not_finite(args, *self.unchecked)
            self.unchecked = None
        self.timer = timer
        return figures, views

    def loader(self, train_set):
        """The rest of the epoch's batches. The epoch's order depends on (seed, epoch) only, so
        a run stopped inside an epoch (--max-steps, a signal, --save-every) resumes at its next
        batch: the same batches. Under torchrun each process takes every W-th image of each
        global batch (models.py's layout)."""
        args, epoch = self.args, self.epoch
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        skip = (self.step - epoch * self.steps_per_epoch) * args.batch_size
        batches = order[skip:][:(len(order) - skip) // args.batch_size * args.batch_size].view(-1, args.batch_size)
        getattr(train_set, "dataset", train_set).draws_seed = args.seed * 1000 + epoch   # per-image draws: by image
        return torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size // self.world, num_workers=args.workers,
            sampler=batches[:, self.rank::self.world].flatten().tolist(), pin_memory=self.parts.device.type == "cuda",
            worker_init_fn=runs.ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))

    def log_step(self, loss, figures):
        """A progress line and a metrics record: loss, lr, the step's figures, images/s."""
        args, step = self.args, self.step
        self.last_log = time.time()
        record = {"epoch": self.epoch + 1, "step": step, "loss": round(loss.item(), 5),
                  "lr": self.parts.scheduler.get_last_lr()[0]}
        record.update({k: round(float(v), 4) for k, v in figures.items() if v is not None and v.numel() == 1})
        rate = (step - self.epoch_first_step) * args.batch_size / (time.perf_counter() - self.epoch_start)
        eta = (self.stop_at - step) * args.batch_size / rate
        shares = "".join(f" {name} {record[key]:.2f}" for name, key in
                         (("fg", "fg_ratio"), ("masked", "masked_fraction")) if key in record)
        self.say(f"epoch {self.epoch + 1}/{args.epochs} step {step}/{self.stop_at} loss {record['loss']:.4f} "
                 f"{rate:.0f} img/s eta {eta / 60:.1f} min{shares}", flush=True)
        self.log({**record, "images_per_s": round(rate, 1)})

    def end_epoch(self, figures, views):
        """A complete epoch counts (and gets its kNN with --knn-every); then its time split,
        its picture of the views, a checkpoint, and a stop if one was asked for."""
        args, rank = self.args, self.rank
        if self.step == (self.epoch + 1) * self.steps_per_epoch:
            self.epoch += 1
            if args.knn_every and self.epoch % args.knn_every == 0 and not self.done:
                split = monitoring_split(args.dataset)                # never the test split, where there is another
                accuracy = knn(args, self.parts.model, self.parts.masker, self.parts.device, split)
                if rank == 0:
                    print(f"epoch {self.epoch}: kNN top-1 {accuracy:.2f} % ({split} split)")
                self.log({"epoch": self.epoch, "step": self.step, f"knn_top1_{split}": accuracy})
        seconds = self.timer.totals()
        self.say(f"epoch {self.epoch} done in {time.perf_counter() - self.epoch_start:.0f} s: "
                 f"{', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}")
        self.log({"epoch": self.epoch, "step": self.step, "time": {k: round(v, 2) for k, v in seconds.items()}})
        if self.step > self.epoch_first_step and rank == 0:           # a batch of this epoch ran here
            picture = os.path.join(args.out, f"views_epoch{self.epoch}.png")
            try:
                masking.save_view_grid(picture, figures, *views, args.grid)
            except OSError as error:                                  # a picture never stops a run
                with contextlib.suppress(OSError):
                    os.remove(picture + ".tmp")
                print(f"warning: could not write {picture} ({error.strerror or error}); training goes on",
                      file=sys.stderr)
        self.save()
        signum, _ = self.agree(self.stop.signum, False)
        if signum and not self.done:
            self.stop_here(signum)

    def log(self, record):
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def minutes(self):
        """The run's training time so far, over every process that a resume continued."""
        return self.minutes_before + (time.time() - self.start_time) / 60

    def save(self):
        runs.save_run(self.last_pt, self.args, self.parts, self.epoch, self.step, self.knn_before, self.minutes())
        self.last_save = time.time()

    def stop_here(self, signum):
        self.save()
        self.say(f"stopped by {signal.Signals(signum).name} at step {self.step} of {self.stop_at} (epoch "
                 f"{self.epoch + 1}); {self.last_pt} is saved: run the same command with --resume auto to continue",
                 file=sys.stderr)
        sys.exit(128 + signum)

    def finish(self):
        """The final kNN, its record and line; a warning when the run ends below its random init."""
        knn_after = knn(self.args, self.parts.model, self.parts.masker, self.parts.device)
        minutes = self.minutes()
        self.log({"final": True, "step": self.step, "knn_top1": knn_after, "knn_top1_random_init": self.knn_before,
                  "minutes": round(minutes, 2)})
        if self.rank != 0:
            return {"step": self.step}
        self.metrics.close()
        knn_before = self.knn_before
        print(f"kNN top-1 on the {self.args.dataset} test split: {knn_after:.2f} % after {self.step} steps, "
              f"{knn_before:.2f} % for the random-init encoder ({knn_after - knn_before:+.2f} points); "
              f"{minutes:.1f} min. Checkpoint: {self.last_pt}")
        if knn_after < knn_before:
            print(f"warning: the trained encoder is {knn_before - knn_after:.2f} kNN points BELOW its random-init "
                  f"encoder: this run learned features worse than none. See the README, 'When the method hurts'",
                  file=sys.stderr)
        return {"knn_top1": knn_after, "knn_top1_random_init": knn_before, "step": self.step}


def stop_if_not_finite(args, step, loss):
    if not torch.isfinite(loss):
        runs.stop_not_finite(args.out, step, f"the loss is {loss.item()}")


def monitoring_split(dataset):
    """What --knn-every reads: shapes' validation split; datasets without one, their test split."""
    return "val" if dataset == "shapes" else "test"


def knn(args, model, masker, device, split="test"):
    """kNN top-1 (%) of the current backbone, train split as memory, `split` as queries, on the
    views the encoders see. Under torchrun process 0 computes it (with the running statistics
    averaged over the processes) and the others wait; they get None."""
    rank, world = models.process_group()
    if world > 1:
        models.average_running_stats(model)
    accuracy = None
    if rank == 0:
        datasets = data.eval_datasets(args.dataset, args.data_dir, args.image_size, split=split,
                                      shapes_size=tuple(args.shapes_size), object_scale=tuple(args.shapes_object_scale),
                                      shapes_cache=args.shapes_cache)
        transform = masker.filter if args.high_pass == "on" else None
        (train_x, train_y), (test_x, test_y) = (evaluate.extract_features(model.backbone, torch.utils.data.DataLoader(
            d, batch_size=256, num_workers=args.workers, worker_init_fn=runs.ignore_stop_signals), device,
            transform=transform) for d in datasets)
        accuracy = evaluate.knn_accuracy(train_x[train_y >= 0], train_y[train_y >= 0], test_x, test_y)
    if world > 1:
        torch.distributed.barrier()
    return accuracy


def main(argv=None):
    args = config.parse_args(argv)
    runs.start_processes(args)
    try:
        return train(args)
    except data.DataError as error:
        # raised in a loader worker, it arrives with the worker's traceback: keep its last line
        runs.fail(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1])
    except RuntimeError as error:                                     # saliency weights: say the fix
        if "--saliency" not in str(error):
            raise
        runs.fail(error)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    runs.run_script(main)
