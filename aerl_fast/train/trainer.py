"""The training loop of one run (one rank of a torchrun job): batches → objective → AdamW,
checkpoints, per-epoch log lines, and the stop on divergence.

Under torchrun the module is wrapped in DistributedDataParallel (aerl_fast.distributed):
--batch-size stays the global batch, each rank trains on its equal slice of it, metrics and
evaluation counts are summed over the ranks, and only rank 0 writes files.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from aerl_fast import distributed as distmod
from aerl_fast import kernels, rng_state, runtime
from aerl_fast.checkpoint import build_from_spec, check_weights_fit, load_checkpoint, save_checkpoint
from aerl_fast.seeds import derived_seed
from aerl_fast.config import RunOptions, TrainConfig
from aerl_fast.data.backends import make_loader
from aerl_fast.distributed import DistContext
from aerl_fast.errors import CheckpointError, ConfigError, UserError
from aerl_fast.objectives import train_step
from aerl_fast.optim import build_optimizer
from aerl_fast.progress import bar_factory as bar_factory_of

from .data import accuracy, prepare_data
from .rundir import RunLog, write_json

CHECK_EVERY = 20  # steps between host reads of the running loss (a sync on CUDA); also before every save


class DivergedError(UserError):
    """Non-finite loss or weights: the run stops before anything non-finite reaches disk."""


class Trainer:
    """One training run; under torchrun (`dist` enabled) one rank of a DistributedDataParallel job."""

    def __init__(self, cfg: TrainConfig, options: RunOptions, run_dir: Path, resume_state=None, log=print,
                 dist: DistContext | None = None):
        self.cfg, self.options, self.run_dir, self.log = cfg, options, run_dir, log
        self.dist = dist = dist if dist is not None else DistContext()
        self.device = dist.device(options.device)
        if self.device.type == "cpu":
            runtime.keep_freed_memory()  # no page faults on every step's activations
        if dist.enabled and cfg.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must be a multiple of the "
                              f"{dist.world_size} processes (equal shards keep the gradient the global-batch mean)")
        torch.manual_seed(cfg.seed)  # initialisation and dropout; data and exploration have their own streams
        # rank 0 first: an image folder is decoded (and cached) once, not once per process
        train, val, test, (mean, std) = dist.main_first(lambda: prepare_data(cfg, options))
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
        self.amp_dtype = runtime.amp_dtype(self.device, options.amp, log=log)
        self.autocast = runtime.autocast_context(self.device, self.amp_dtype) if self.amp_dtype else None
        self.forward_model = self.model
        compile_ = runtime.should_compile(self.device, options.compile)
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
                                                      loader=options.loader,
                                                      channels_last=runtime.channels_last_batches(self.device))
        if dist.enabled:
            if len(train.labels) < dist.world_size:
                raise ConfigError(f"{len(train.labels)} training images cannot feed {dist.world_size} processes")
            self.loader = distmod.ShardedLoader(self.loader, dist.rank, dist.world_size)
        log(f"loader: {self.loader_choice.name} ({self.loader_choice.reason})"
            + (f"; {dist.world_size} processes ({dist.backend}), {cfg.batch_size // dist.world_size} "
               f"images per process per step" if dist.enabled else ""))
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.device, len(self.loader))
        self.objective = cfg.objective_config()
        self.explore_gen = rng_state.exploration_generator(cfg.seed, dist.rank)  # per-rank ε-greedy draws, CPU
        self.epoch, self.step, self.best_val = 0, 0, -1.0
        self.progress = self._empty_progress()
        if resume_state is not None:
            self._restore(resume_state)

    # -- state ------------------------------------------------------------------------------
    def _empty_progress(self):
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        return {"loss": z(), "loss_adv": z(), "correct": z(), "reward": z(), "seen": 0, "train_s": 0.0}

    def _rng_state(self) -> dict:
        return rng_state.capture(self.explore_gen, self.device)

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
        check_weights_fit(self.model, st["model"], self.run_dir / "last.pt")  # names the key and both shapes
        try:
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint does not fit this run ({str(exc).splitlines()[0]})") from None
        # a --resume with a lower --lr: the schedule continues from the new base rate
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
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
            s = derived_seed(self.cfg.seed, dist.rank, self.epoch, self.step)
            torch.manual_seed(s)
            self.explore_gen.manual_seed(derived_seed(s, rng_state.EXPLORE_OFFSET))
            rng = None
        if rng is not None:
            fresh = derived_seed(self.cfg.seed, dist.rank, self.epoch, self.step)
            for note in rng_state.restore(rng, self.explore_gen, self.device, fresh):
                self.log(f"resume: {note}")

    def check_finite(self, where: str):
        """Stop with DivergedError when the running loss or any weight is not finite (one host read)."""
        seen = max(1, self.progress["seen"])
        loss = (self.progress["loss"] / seen).item()
        params = [p.detach() for p in self.model.parameters()]
        weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
        if not math.isfinite(loss):
            self.diverged(f"loss {loss}", where)
        if not weights_ok:
            self.diverged("non-finite weights", where)

    def diverged(self, what: str, where: str):
        kept = (f"the last good checkpoint is kept in {self.run_dir}"
                if (self.run_dir / "last.pt").exists() else "no checkpoint was written yet")
        raise DivergedError(
            f"training diverged: {what} at epoch {self.epoch + 1} step {self.step} ({where}); {kept}. Likely cause: the "
            f"learning rate ({self.cfg.lr:g}) is too high for this objective and batch size; continue with a lower one: "
            f"python -m aerl_fast.train --resume {self.run_dir} --lr {self.cfg.lr / 10:g}")

    def save(self, *names):
        """Write the current state under each of `names` (default last.pt), gathered once, after the
        finiteness check (nothing non-finite is ever written).  Rank 0 writes (atomically); every
        rank takes part in gathering the state and waits for the write."""
        self.check_finite("before writing a checkpoint")
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
        try:
            out = train_step(self.forward_model, x, y, self.objective, adv_active=adv_active,
                             generator=self.explore_gen, autocast=self.autocast)
        except RuntimeError as exc:  # e.g. sampling actions from a policy whose logits overflowed
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "nan" in text.lower() or "inf" in text.lower():
                self.diverged("non-finite logits", f"the objective failed: {text}")
            raise
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
        bar = bar_factory(steps, f"epoch {self.epoch + 1}/{cfg.epochs}", initial=self.step)
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
            if self.step % CHECK_EVERY == 0 or self.step == steps:  # one host sync per CHECK_EVERY steps
                self.check_finite("running loss")
                if not bar.disable:
                    seen = max(1, pr["seen"])
                    bar.set_postfix(loss=f"{(pr['loss'] / seen).item():.4f}",
                                    acc=f"{(pr['correct'] / seen).item():.3f}")
            if self.options.checkpoint_minutes and self.step < steps and self.dist.agree(  # rank 0's clock
                    time.monotonic() - last_ckpt > 60 * self.options.checkpoint_minutes):
                pr["train_s"] += time.perf_counter() - start
                start = time.perf_counter()
                self.save()
                last_ckpt = time.monotonic()
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        pr["train_s"] += time.perf_counter() - start

    def run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        log = RunLog(self.run_dir) if dist.is_main else None
        bar_factory = bar_factory_of(self.options.progress and dist.is_main, unit="batch")
        try:
            while self.epoch < cfg.epochs:
                self._one_epoch(bar_factory, log)
        finally:
            if log is not None:
                log.close()
        return self.finish()

    def _one_epoch(self, bar_factory, log):
        cfg, dist = self.cfg, self.dist
        t0 = time.perf_counter()
        self.train_epoch(bar_factory)
        pr = self.reduced_progress()
        seen = max(1, pr["seen"])
        spread = dist.weight_spread(self.model) if dist.enabled else None
        dist.broadcast_module(self.model, buffers_only=True)  # BatchNorm running stats: rank 0's
        val_acc = accuracy(self.eval_model, self.val.images, self.val.labels, self.options.eval_batch_size,
                           self.device, self.autocast, dist=dist if dist.enabled else None) \
            if len(self.val.labels) else None
        self.check_finite("end of epoch")
        train_loss = (pr["loss"] / seen).item()
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
        if self.options.save_every and self.epoch % self.options.save_every == 0:
            names.append(f"epoch_{self.epoch:04d}.pt")  # periodic checkpoint, kept
        if improved:
            names.append("best.pt")
        if log is not None:  # the epoch's line first: a resume drops lines its checkpoint lacks
            log.epoch(record)
        self.save(*names)
        self.log(f"epoch {record['epoch']}/{cfg.epochs}  loss {train_loss:.4f}  train_acc {record['train_acc']:.3f}  "
                 f"val_acc {val_acc if val_acc is None else round(val_acc, 4)}  {record['images_per_s']:.0f} img/s  "
                 f"{record['epoch_s']:.1f}s" + ("  *" if improved else ""))

    def finish(self) -> dict:
        """Test accuracy of best.pt and summary.json.  Under torchrun rank 0 reads best.pt and sends its
        weights to the others (no shared filesystem needed), every rank tests a shard of the test set,
        rank 0 writes the summary and every rank returns it."""
        dist = self.dist
        best = dist.on_main(lambda: (lambda b: {"model": b["model"], "epoch": int(b["epoch"])})(
            load_checkpoint(self.run_dir / "best.pt", map_location="cpu" if dist.enabled else self.device)))
        model = build_from_spec(self.spec).to(self.device)
        model.load_state_dict(best["model"])
        test_acc = accuracy(model, self.test.images, self.test.labels, self.options.eval_batch_size, self.device,
                            self.autocast, dist=dist if dist.enabled else None)
        return dist.on_main(lambda: self._write_summary(best, test_acc))

    def _write_summary(self, best, test_acc) -> dict:
        import json
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
            "kernel_fallbacks": kernels.fallbacks(),  # a broken GPU path is never hidden behind the reference
        }
        if self.dist.enabled:
            summary["world_size"] = self.dist.world_size
        write_json(self.run_dir / "summary.json", summary)
        return summary
