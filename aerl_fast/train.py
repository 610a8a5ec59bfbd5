"""Train one model of the study:  python -m aerl_fast.train [--preset NAME] [flags]

Data flows one way: source (uint8 arrays) → DeviceLoader (device-resident, batched augmentation)
→ objective (SL / RL / adv, through aerl_fast.kernels) → AdamW.  Each epoch appends a line to
log.jsonl and writes last.pt (and best.pt on a new best validation accuracy) atomically; a run
killed at any point continues with `--resume RUN_DIR` from its last checkpoint, mid-epoch included,
and reproduces the uninterrupted run.

Under `torchrun --nproc_per_node=N` the same command trains with DistributedDataParallel
(aerl_fast.distributed): --batch-size stays the global batch, each rank trains on its equal slice
of it, metrics and evaluation counts are summed over the ranks, and only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from aerl_fast import distributed as distmod
from aerl_fast import runtime
from aerl_fast.checkpoint import build_from_spec, load_checkpoint, save_checkpoint
from aerl_fast.config import TrainConfig, parse_config
from aerl_fast.data import CHANNEL_STATS, load_dataset, stratified_split
from aerl_fast.data.backends import make_loader
from aerl_fast.data.loader import DeviceLoader
from aerl_fast.distributed import DistContext
from aerl_fast.errors import CheckpointError, ConfigError, UserError
from aerl_fast.objectives import train_step

# the loaders give bit-identical batches (a resume across them is tested) and both decoders feed one cache
RESUMABLE_CHANGES = {"epochs", "device", "amp", "compile", "progress", "eval_batch_size",
                     "checkpoint_minutes", "save_every", "overwrite", "out", "preset", "decoder", "loader"}


# ----------------------------------------------------------------------------------------- data

def prepare_data(cfg: TrainConfig):
    """(train, val, test) ImageSets after the stratified split, and the normalisation statistics."""
    from aerl_fast.data.base import ImageSet
    kw = dict(labels=cfg.labels, image_size=cfg.image_size, download=cfg.download, seed=cfg.seed,
              decoder=cfg.decoder, decode_device=cfg.device)  # DALI decodes on the training device
    full = load_dataset(cfg.dataset, cfg.data_dir, "train", **kw)
    test = load_dataset(cfg.dataset, cfg.data_dir, "test", **kw)
    if len(full.labels) == 0 or len(test.labels) == 0:
        raise ConfigError(f"{cfg.dataset}: empty {'train' if len(full.labels) == 0 else 'test'} split")
    if test.images.shape[1:] != full.images.shape[1:]:
        raise ConfigError(f"{cfg.dataset}: train images {full.images.shape[1:]} but test images {test.images.shape[1:]}")
    tr_idx, va_idx = stratified_split(full.labels, cfg.val_frac, cfg.split_seed)
    if cfg.train_subset and cfg.train_subset < len(tr_idx):
        keep, _ = stratified_split(full.labels[tr_idx], 1.0 - cfg.train_subset / len(tr_idx), cfg.split_seed + 1)
        tr_idx = tr_idx[keep]
    train = ImageSet(full.images[tr_idx], full.labels[tr_idx], full.classes)
    val = ImageSet(full.images[va_idx], full.labels[va_idx], full.classes)
    if cfg.dataset in CHANNEL_STATS:
        mean, std = CHANNEL_STATS[cfg.dataset]
    else:  # statistics of the training split, computed once
        px = train.images.reshape(-1, 3).astype(np.float64) / 255.0
        mean, std = tuple(px.mean(0).tolist()), tuple(np.maximum(px.std(0), 1e-3).tolist())
    return train, val, test, (list(mean), list(std))


# ------------------------------------------------------------------------------------ schedule

def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of --lr at global optimizer step `step` (the study's SL: warm-up then linear decay)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule != "constant" and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "warmup-linear":
        frac = (step - warm) / max(1, total - warm)
        return 1.0 - (1.0 - cfg.final_lr_frac) * min(1.0, frac)
    if cfg.schedule == "cosine":
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return cfg.final_lr_frac + (1.0 - cfg.final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


# ---------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def accuracy(model, images, labels, batch_size: int, device, autocast=None, dist: DistContext | None = None) -> float:
    """Top-1 accuracy of argmax predictions (eval mode), on uint8 NHWC images.

    Under torchrun each rank evaluates its contiguous share of the set and the correct counts are
    summed over the ranks (every rank gets the same number back)."""
    lo, hi = (0, len(labels)) if dist is None else distmod.shard_range(len(labels), dist.rank, dist.world_size)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    if hi > lo:
        loader = DeviceLoader(images[lo:hi], labels[lo:hi], batch_size, device=device, shuffle=False)
        for x, y in loader:
            with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    if dist is not None:
        dist.all_reduce_sum(correct)
    return correct.item() / len(labels)


# -------------------------------------------------------------------------------------- logging

class RunLog:
    """log.jsonl (one line per epoch), TensorBoard when installed, and progress bars."""

    def __init__(self, run_dir: Path, enabled_tb: bool = True):
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if enabled_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # tensorboard not installed: the jsonl log is the record
                self.tb = None

    def epoch(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record["epoch"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def truncate_log(path: Path, epochs_done: int):
    """On resume, drop log lines of epochs the checkpoint does not contain (written after it)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epochs_done]  # epochs are 1-based
    path.write_text("".join(ln + "\n" for ln in kept))


# --------------------------------------------------------------------------------------- runner

class Trainer:
    """One training run; under torchrun (`dist` enabled) one rank of a DistributedDataParallel job."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume_state=None, log=print, dist: DistContext | None = None):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.dist = dist = dist if dist is not None else DistContext()
        self.device = dist.device(cfg.device)
        if self.device.type == "cpu":
            runtime.keep_freed_memory()  # no page faults on every step's activations
        if dist.enabled and cfg.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must be a multiple of the "
                              f"{dist.world_size} processes (equal shards keep the gradient the global-batch mean)")
        torch.manual_seed(cfg.seed)  # initialisation and dropout; data and exploration have their own streams
        # rank 0 first: an image folder is decoded (and cached) once, not once per process
        train, val, test, (mean, std) = dist.main_first(lambda: prepare_data(cfg))
        self.val, self.test = val, test
        self.classes = train.classes
        self.spec = dict(name=cfg.model, width=cfg.width, num_classes=len(train.classes), mean=mean,
                         std=std, image_size=int(train.images.shape[1]))
        if resume_state is not None:
            saved = resume_state["model_spec"]
            if saved != self.spec:
                raise CheckpointError(f"checkpoint is for {saved['name']} (width {saved['width']}, "
                                      f"{saved['num_classes']} classes), this run builds {self.spec['name']} "
                                      f"(width {self.spec['width']}, {self.spec['num_classes']} classes)")
        self.model = build_from_spec(self.spec).to(self.device)
        if runtime.prefers_channels_last(self.device):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = runtime.amp_dtype(self.device, cfg.amp, log=log)
        self.autocast = runtime.autocast_context(self.device, self.amp_dtype) if self.amp_dtype else None
        self.forward_model = self.model
        compile_ = runtime.should_compile(self.device, cfg.compile)
        if dist.enabled:
            # identical initial weights (same seed) and DDP broadcasts rank 0's anyway; from here on
            # dropout draws differ per rank; rank 0 keeps the single-process stream
            if dist.rank > 0:
                torch.manual_seed(cfg.seed + dist.rank * distmod.RANK_PRIME)
            from torch.nn.parallel import DistributedDataParallel
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            # evaluation runs on the plain module: DDP's forward is collective, eval shards are not equal
            self.eval_model = torch.compile(self.model) if compile_ else self.model
        if compile_:
            self.forward_model = torch.compile(self.forward_model)
        if not dist.enabled:
            self.eval_model = self.forward_model
        self.loader, self.loader_choice = make_loader(cfg, train.images, train.labels, self.device,
                                                      channels_last=runtime.channels_last_batches(self.device))
        if dist.enabled:
            if len(train.labels) < dist.world_size:
                raise ConfigError(f"{len(train.labels)} training images cannot feed {dist.world_size} processes")
            self.loader = distmod.ShardedLoader(self.loader, dist.rank, dist.world_size)
        log(f"loader: {self.loader_choice.name} ({self.loader_choice.reason})"
            + (f"; {dist.world_size} processes ({dist.backend}), {cfg.batch_size // dist.world_size} "
               f"images per process per step" if dist.enabled else ""))
        fused = runtime.fused_adamw_supported(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           **({"fused": True} if fused else {}))
        steps = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s, steps))
        self.objective = cfg.objective_config()
        self.explore_gen = torch.Generator(device=self.device)
        self.explore_gen.manual_seed(cfg.seed + 7919 + dist.rank * distmod.RANK_PRIME)  # per-rank ε-greedy draws
        self.epoch, self.step, self.best_val = 0, 0, -1.0
        self.progress = self._empty_progress()
        if resume_state is not None:
            self._restore(resume_state)

    # -- state ------------------------------------------------------------------------------
    def _empty_progress(self):
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        return {"loss": z(), "loss_adv": z(), "correct": z(), "reward": z(), "seen": 0, "train_s": 0.0}

    def _rng_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state(), "explore": self.explore_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def reduced_progress(self) -> dict:
        """The epoch accumulators summed over the ranks (loss/reward/correct sums and images seen);
        training time is rank 0's.  A collective under torchrun: every rank calls it."""
        pr = self.progress
        if not self.dist.enabled:
            return pr
        keys = ("loss", "loss_adv", "correct", "reward")
        vec = torch.stack([pr[k] for k in keys] + [torch.tensor(float(pr["seen"]), dtype=torch.float64,
                                                                  device=self.device)])
        self.dist.all_reduce_sum(vec)
        out = dict(pr, **{k: vec[i] for i, k in enumerate(keys)})
        out["seen"] = int(round(vec[-1].item()))
        return out

    def state(self) -> dict:
        """The checkpoint: the plain module's weights (no DDP prefix), rank 0's RNG states in "rng" and,
        under torchrun, every rank's in "rng_ranks" (a collective: every rank calls it)."""
        rng = self._rng_state()
        progress = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in self.reduced_progress().items()}
        st = {"model_spec": self.spec, "model": self.model.state_dict(),
              "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
              "epoch": self.epoch, "step": self.step, "progress": progress, "rng": rng,
              "best_val_acc": self.best_val, "config": self.cfg.to_json(), "classes": list(self.classes)}
        if self.dist.enabled:
            st["rng_ranks"] = self.dist.all_gather_object(rng)
        return st

    def _restore(self, st):
        try:
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint does not fit this run ({str(exc).splitlines()[0]})") from None
        self.epoch, self.step, self.best_val = int(st["epoch"]), int(st["step"]), float(st["best_val_acc"])
        self.progress = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in st["progress"].items()}
        dist, rng = self.dist, st["rng"]
        if dist.rank > 0:  # the saved sums are global: rank 0 carries them, the others start from zero
            self.progress = dict(self.progress, **{k: torch.zeros_like(v) for k, v in self.progress.items()
                                                   if torch.is_tensor(v)}, seen=0)
        ranks = st.get("rng_ranks")
        if ranks is not None and len(ranks) == dist.world_size:
            rng = ranks[dist.rank]
        elif dist.enabled and dist.rank == 0:
            self.log(f"checkpoint holds RNG states of {len(ranks) if ranks else 1} process(es), this job has "
                     f"{dist.world_size}: ranks > 0 re-derive theirs from (seed, rank, epoch, step)")
        elif dist.rank > 0:
            # saved by a job of another size: rank 0 continues the saved streams, the others start
            # streams derived from (seed, rank, epoch, step) — reproducible, not the lost ones
            s = distmod.derived_seed(self.cfg.seed, dist.rank, self.epoch, self.step)
            torch.manual_seed(s)
            self.explore_gen.manual_seed(distmod.derived_seed(s, 7919))
            rng = None
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            self.explore_gen.set_state(rng["explore"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self, *names):
        """Write the current state under each of `names` (default last.pt), gathered once.  Rank 0
        writes (atomically); every rank takes part in gathering the state and waits for the write, so
        no rank runs ahead of a checkpoint that may be read back."""
        state = self.state()
        if self.dist.is_main:
            for name in names or ("last.pt",):
                save_checkpoint(state, self.run_dir / name)
        self.dist.barrier()

    # -- loop -------------------------------------------------------------------------------
    def train_batch(self, x, y, adv_active: bool):
        """One optimizer step on one (per-rank) batch; under DDP the gradients are averaged over the
        ranks during backward, so clipping and the step see the global-batch gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        out = train_step(self.forward_model, x, y, self.objective, adv_active=adv_active,
                         generator=self.explore_gen, autocast=self.autocast)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return out

    def train_epoch(self, bar_factory):
        cfg, model = self.cfg, self.forward_model
        model.train()
        adv_active = self.epoch >= cfg.adv_start_epoch
        pr = self.progress
        last_ckpt = time.monotonic()
        start = time.perf_counter()
        steps = len(self.loader)
        bar = bar_factory(total=steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{cfg.epochs}")
        for x, y in self.loader.epoch(self.epoch, self.step):
            out = self.train_batch(x, y, adv_active)
            n = y.shape[0]
            pr["loss"] += out.loss_clean.double() * n
            pr["correct"] += (out.logits.argmax(1) == y).sum()
            if out.loss_adv is not None:
                pr["loss_adv"] += out.loss_adv.double() * n
            if out.reward is not None:
                pr["reward"] += out.reward.double() * n
            pr["seen"] += n
            self.step += 1
            bar.update(1)
            if not bar.disable and (self.step % 20 == 0 or self.step == steps):  # one host sync per 20 steps
                loss = (pr["loss"] / max(1, pr["seen"])).item()
                if not math.isfinite(loss):
                    raise UserError(f"training diverged: loss {loss} at epoch {self.epoch + 1} step {self.step} "
                                    f"(last good checkpoint kept in {self.run_dir}); lower --lr")
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{(pr['correct'] / max(1, pr['seen'])).item():.3f}")
            if cfg.checkpoint_minutes and self.step < steps and self.dist.agree(  # rank 0's clock decides
                    time.monotonic() - last_ckpt > 60 * cfg.checkpoint_minutes):
                pr["train_s"] += time.perf_counter() - start
                start = time.perf_counter()
                self.save()
                last_ckpt = time.monotonic()
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        pr["train_s"] += time.perf_counter() - start

    def run(self):
        cfg = self.cfg
        dist = self.dist
        log = RunLog(self.run_dir) if dist.is_main else None
        bar_factory = _bar_factory(cfg.progress and dist.is_main)
        try:
            while self.epoch < cfg.epochs:
                t0 = time.perf_counter()
                self.train_epoch(bar_factory)
                pr = self.reduced_progress()
                seen = max(1, pr["seen"])
                spread = dist.weight_spread(self.model) if dist.enabled else None
                dist.broadcast_module(self.model, buffers_only=True)  # BatchNorm running stats: rank 0's
                val_acc = accuracy(self.eval_model, self.val.images, self.val.labels, cfg.eval_batch_size,
                                   self.device, self.autocast, dist=dist if dist.enabled else None) \
                    if len(self.val.labels) else None
                train_loss = (pr["loss"] / seen).item()
                if not math.isfinite(train_loss):
                    raise UserError(f"training diverged: loss {train_loss} in epoch {self.epoch + 1}; lower --lr")
                record = {
                    "epoch": self.epoch + 1,
                    "train_loss": train_loss,
                    "train_acc": (pr["correct"] / seen).item(),
                    "val_acc": val_acc,
                    "images_per_s": pr["seen"] / max(pr["train_s"], 1e-9),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "adv_active": bool(self.objective.is_adv and self.epoch >= cfg.adv_start_epoch),
                    "loader": self.loader_choice.name,
                }
                if self.objective.is_rl:
                    record["train_reward"] = (pr["reward"] / seen).item()
                if record["adv_active"]:
                    record["train_loss_adv"] = (pr["loss_adv"] / seen).item()
                if dist.enabled:
                    record["world_size"] = dist.world_size
                    record["rank_weight_spread"] = spread  # replicas must stay identical: 0.0
                    if spread != 0.0:
                        self.log(f"warning: the {dist.world_size} replicas' weights differ (spread {spread:.3g}) "
                                 f"after epoch {self.epoch + 1}")
                self.epoch += 1
                self.step = 0
                self.progress = self._empty_progress()
                improved = val_acc is None or val_acc > self.best_val  # no validation set: best = latest
                if improved:
                    self.best_val = val_acc if val_acc is not None else -1.0
                record["epoch_s"] = time.perf_counter() - t0
                record["best"] = improved
                names = ["last.pt"]
                if cfg.save_every and self.epoch % cfg.save_every == 0:
                    names.append(f"epoch_{self.epoch:04d}.pt")  # periodic checkpoint, kept
                if improved:
                    names.append("best.pt")
                self.save(*names)
                if log is not None:
                    log.epoch(record)
                self.log(f"epoch {record['epoch']}/{cfg.epochs}  loss {train_loss:.4f}  train_acc {record['train_acc']:.3f}  "
                         f"val_acc {val_acc if val_acc is None else round(val_acc, 4)}  {record['images_per_s']:.0f} img/s  {record['epoch_s']:.1f}s"
                         + ("  *" if improved else ""))
        finally:
            if log is not None:
                log.close()
        return self.finish()

    def finish(self) -> dict:
        """Test accuracy of best.pt and summary.json.  Under torchrun rank 0 reads best.pt and sends its
        weights to the others (no shared filesystem needed), every rank tests a shard of the test set,
        rank 0 writes the summary and every rank returns it."""
        cfg, dist = self.cfg, self.dist
        best = dist.on_main(lambda: (lambda b: {"model": b["model"], "epoch": int(b["epoch"])})(
            load_checkpoint(self.run_dir / "best.pt", map_location="cpu" if dist.enabled else self.device)))
        model = build_from_spec(self.spec).to(self.device)
        model.load_state_dict(best["model"])
        test_acc = accuracy(model, self.test.images, self.test.labels, cfg.eval_batch_size, self.device,
                            self.autocast, dist=dist if dist.enabled else None)
        return dist.on_main(lambda: self._write_summary(best, test_acc))

    def _write_summary(self, best, test_acc) -> dict:
        cfg = self.cfg
        records = [json.loads(ln) for ln in (self.run_dir / "log.jsonl").read_text().splitlines() if ln.strip()]
        summary = {
            "dataset": cfg.dataset, "model": cfg.model, "width": cfg.width, "objective": cfg.objective,
            "epochs": cfg.epochs, "best_epoch": int(best["epoch"]), "best_val_acc": self.best_val,
            "test_acc": test_acc, "num_classes": self.spec["num_classes"],
            "train_images_per_s": float(np.median([r["images_per_s"] for r in records])) if records else None,
            "total_train_s": float(sum(r["epoch_s"] for r in records)),
            "device": str(self.device), "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
            "loader": self.loader_choice.name,
            "run_dir": str(self.run_dir),
        }
        if self.dist.enabled:
            summary["world_size"] = self.dist.world_size
        _write_json(self.run_dir / "summary.json", summary)
        return summary


def _bar_factory(enabled: bool):
    from tqdm import tqdm

    def make(**kw):
        return tqdm(disable=None if enabled else True, leave=False, unit="batch", file=sys.stderr, dynamic_ncols=True, **kw)
    return make


def _write_json(path: Path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.model}-{cfg.objective}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run(cfg: TrainConfig, resume, given):
    """(cfg, run_dir, checkpoint state or None): new run folder, or the config of the run resumed."""
    if resume is None:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
            raise ConfigError(f"{run_dir} already holds files; pass --overwrite to reuse it, "
                              f"or --resume {run_dir} to continue it")
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("log.jsonl", "summary.json", "best.pt", "last.pt"):
            (run_dir / stale).unlink(missing_ok=True)
        for stale in run_dir.glob("epoch_[0-9]*.pt"):  # periodic checkpoints of an earlier run
            stale.unlink()
        _write_json(run_dir / "config.json", cfg.to_json())
        return cfg, run_dir, None
    run_dir = Path(resume)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json)")
    if not (run_dir / "last.pt").is_file():
        raise CheckpointError(f"{run_dir}: no last.pt to resume from (the run stopped before its first checkpoint)")
    saved = json.loads((run_dir / "config.json").read_text())
    unknown = set(saved) - set(asdict(cfg))
    if unknown:
        raise CheckpointError(f"{run_dir}/config.json: unknown key(s) {', '.join(sorted(unknown))}")
    merged = TrainConfig(**saved)
    for key in given:
        new, old = getattr(cfg, key), saved.get(key)
        if key in RESUMABLE_CHANGES:
            setattr(merged, key, new)
        elif new != old:
            raise ConfigError(f"--{key.replace('_', '-')} {new} differs from the run's {old}; "
                              f"only {', '.join(sorted('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES))} may change on resume")
    merged.validate()
    state = load_checkpoint(run_dir / "last.pt")
    if merged.epochs < int(state["epoch"]):
        raise ConfigError(f"--epochs {merged.epochs} is below the {state['epoch']} epochs already done")
    _write_json(run_dir / "config.json", merged.to_json())
    truncate_log(run_dir / "log.jsonl", int(state["epoch"]))
    return merged, run_dir, state


def _open_run_on_main(dist: DistContext, cfg: TrainConfig, resume, given):
    """open_run on rank 0 (the only writer); the other ranks receive the resolved config, the run
    folder and the checkpoint state from it (no shared filesystem needed)."""
    def opened():
        cfg_, run_dir, state = open_run(cfg, resume, given)
        return cfg_.to_json(), str(run_dir), state
    cfg_json, run_dir, state = dist.on_main(opened)
    return TrainConfig(**cfg_json), Path(run_dir), state


def main(argv=None) -> dict:
    dist = DistContext()
    try:
        dist = distmod.init()
        say = (lambda m: print(m, file=sys.stderr)) if dist.is_main else (lambda m: None)
        cfg, resume, given = parse_config(argv)
        cfg.validate()
        if dist.enabled:
            cfg, run_dir, state = _open_run_on_main(dist, cfg, resume, given)
        else:
            cfg, run_dir, state = open_run(cfg, resume, given)
        if state is not None:
            say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['step']}")
        trainer = Trainer(cfg, run_dir, resume_state=state, log=say, dist=dist)
        done = dist.on_main(lambda: json.loads((run_dir / "summary.json").read_text())
                            if trainer.epoch >= cfg.epochs and (run_dir / "summary.json").exists() else None)
        summary = done if done is not None else trainer.run()
    except UserError as exc:
        if dist.is_main:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        distmod.shutdown(dist)
    if not dist.is_main:
        return summary
    print(f"done: {summary['objective']} {summary['model']} on {summary['dataset']}: best val_acc "
          f"{summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}), test_acc {summary['test_acc']:.4f}, "
          f"{summary['train_images_per_s']:.0f} img/s, {summary['total_train_s']:.0f}s -> {summary['run_dir']}")
    return summary


if __name__ == "__main__":
    main()
