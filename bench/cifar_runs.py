"""Small AliCNNs trained on the real CIFAR-10 images in ../shared/data (the benchmarks' models in
the study's regime), cached as run folders the way `aerl_fast.train` writes them.

CIFAR_DIR (BENCH_CIFAR_DIR overrides it) holds `cifar-10-batches-py/`; benchmarks that need it
skip when it is absent.  The package itself never reads this folder.
"""
import os
from pathlib import Path

import numpy as np
import torch

import aerl_fast
from aerl_fast.data import CHANNEL_STATS
from aerl_fast.models import build_model
from aerl_fast.objectives import ObjectiveConfig, train_step
from eval_fixtures import write_run

CIFAR_DIR = Path(os.environ.get("BENCH_CIFAR_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
STEPS = {"sl": 800, "rl": 1600}   # RL learns from one sampled action per image: twice the steps


def cifar_available() -> bool:
    return (CIFAR_DIR / "cifar-10-batches-py").is_dir()


def cifar_test(n: int):
    """The first n CIFAR-10 test images (float [n, 3, 32, 32] in [0, 1]) and labels."""
    te = aerl_fast.load_dataset("cifar10", CIFAR_DIR, "test")
    x = torch.from_numpy(np.array(te.images[:n])).permute(0, 3, 1, 2).float().div_(255).contiguous()
    return x, torch.from_numpy(np.array(te.labels[:n], dtype=np.int64))


def train_cifar(root: Path, objective: str = "sl") -> Path:
    """AliCNN (width 0.5) trained with `objective` ("sl" or "rl", exploration 0.1) on the CIFAR-10
    training images: STEPS[objective] AdamW steps of 64 with random horizontal flips (SL: ~70 s on
    one core, ~59% test accuracy on data_batch_1 alone).  Cached under `root`."""
    run = Path(root) / f"cifar10-alicnn-w0.5-{objective}"
    if (run / "best.pt").is_file():
        return run
    tr = aerl_fast.load_dataset("cifar10", CIFAR_DIR, "train")
    x = torch.from_numpy(np.array(tr.images)).permute(0, 3, 1, 2).float().div_(255)
    y = torch.from_numpy(np.array(tr.labels, dtype=np.int64))
    mean, std = CHANNEL_STATS["cifar10"]
    torch.manual_seed(0)
    model = build_model("alicnn", 10, width=0.5, mean=mean, std=std)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    cfg = ObjectiveConfig(kind=objective, explore_eps=0.1) if objective == "rl" else ObjectiveConfig(kind="sl")
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS[objective]):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        flip = torch.rand(64, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], x[idx].flip(3), x[idx])
        opt.zero_grad(set_to_none=True)
        train_step(model, xb, y[idx], cfg, adv_active=False, generator=gen)
        opt.step()
    xt, yt = cifar_test(10_000)
    with torch.no_grad():
        acc = float((model.eval()(xt).argmax(1) == yt).double().mean())
    spec = dict(name="alicnn", width=0.5, num_classes=10, mean=list(mean), std=list(std), image_size=32)
    write_run(run, model, objective, spec, acc, dataset="cifar10", data_dir=str(CIFAR_DIR))
    return run
