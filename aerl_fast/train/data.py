"""The data a run trains and is judged on: the stratified train/validation split, the
normalisation statistics, and top-1 accuracy on a uint8 split."""
from __future__ import annotations

import numpy as np
import torch

from aerl_fast import distributed as distmod
from aerl_fast.config import RunOptions, TrainConfig
from aerl_fast.data import CHANNEL_STATS, load_dataset, stratified_split
from aerl_fast.data.base import ImageSet
from aerl_fast.data.loader import DeviceLoader
from aerl_fast.distributed import DistContext
from aerl_fast.errors import ConfigError


def prepare_data(cfg: TrainConfig, options: RunOptions | None = None):
    """(train, val, test) ImageSets after the stratified split, and the normalisation statistics."""
    options = options or RunOptions()
    kw = dict(labels=cfg.labels, image_size=cfg.image_size, download=options.download, seed=cfg.seed,
              decoder=options.decoder, decode_device=options.device)  # DALI decodes on the training device
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
