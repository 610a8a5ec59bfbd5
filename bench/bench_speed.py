"""pytest-benchmark: loaders with DALI, the trainer's overhead, and the GPU-only fast paths.

    python -m pytest bench/bench_speed.py --benchmark-only -s     (BENCH_THREADS: bench/conftest.py)

Groups (the first case of each group is its baseline; every case prints its ratio to it, through
bench/baselines.py, the one bookkeeping every bench file uses):
- speed loader: the study's per-image PIL DataLoader (baseline) against the tensor DeviceLoader and
  the DALI CPU pipeline (device_id=None); on a GPU also the tensor loader and DALI's GPU pipeline.
- speed decode image folder: ImageNet-sized JPEGs (400x300) decoded and resized to 32 px once
  (the image-folder source), Pillow threads (baseline) against DALI's CPU decoder and, on a GPU,
  nvJPEG through DALI ("mixed").
- trainer overhead: the bare step (forward, a cross-entropy loss, backward, fused AdamW) on the
  loader's batches, materialised beforehand (baseline), against `Trainer.train_epoch` over the same
  number of batches: loader, RL objective (aerl_fast.kernels), optimizer, scheduler and the
  per-step bookkeeping.  Target: trainer / bare <= 1.10 on CPU.
- step cuda: eager fp32 against compiled bf16 channels_last (GPU only).
GPU cases skip here with a reason; DALI cases skip when nvidia.dali is not installed.
"""
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import baseline_of, record  # noqa: E402
from bench_training import _images, study_pil_loader  # noqa: E402

from aerl_fast import runtime  # noqa: E402
from aerl_fast.data.dali import dali_available  # noqa: E402
from aerl_fast.data.loader import Augment, DeviceLoader  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed (pip install 'aerl_fast[dali]')")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none on this machine)")
LOADER = "speed loader"


def _epochs():
    return iter(range(10 ** 9))


def _time_loader(benchmark, loader, name, sync=None, rounds=5):
    n, epoch = loader.num_samples, _epochs()

    def run():
        for _ in loader.epoch(next(epoch)):
            pass
        if sync:
            sync()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, LOADER, name, benchmark.stats.stats.min / n, "image")
    benchmark.extra_info["images_per_s"] = round(n / benchmark.stats.stats.min)


# ----------------------------------------------------------------------------------------- loaders

def test_loader_study_pil(benchmark):
    images, labels = _images()
    n = 2560
    loader = study_pil_loader(images[:n], labels[:n])

    def run():
        for _ in loader:
            pass
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    record(benchmark, LOADER, "study PIL DataLoader", benchmark.stats.stats.min / n, "image", baseline=True)
    benchmark.extra_info["images_per_s"] = round(n / benchmark.stats.stats.min)


def test_loader_tensor_cpu(benchmark):
    images, labels = _images()
    _time_loader(benchmark, DeviceLoader(images, labels, 128, augment=Augment(), seed=0), "tensor DeviceLoader (cpu)")


@needs_dali
def test_loader_dali_cpu(benchmark):
    from aerl_fast.data.dali import DaliLoader
    images, labels = _images()
    loader = DaliLoader(images, labels, 128, augment=Augment(), seed=0, device="cpu")
    assert loader.device_id is None
    _time_loader(benchmark, loader, "DALI CPU pipeline (device_id=None)")


@needs_cuda
def test_loader_tensor_cuda(benchmark):
    images, labels = _images()
    loader = DeviceLoader(images, labels, 256, augment=Augment(), seed=0, device="cuda", channels_last=True)
    _time_loader(benchmark, loader, "tensor DeviceLoader (cuda)", sync=torch.cuda.synchronize)


@needs_cuda
@needs_dali
def test_loader_dali_gpu(benchmark):
    from aerl_fast.data.dali import DaliLoader
    images, labels = _images()
    loader = DaliLoader(images, labels, 256, augment=Augment(), seed=0, device="cuda", channels_last=True,
                        num_threads=4)
    _time_loader(benchmark, loader, "DALI GPU pipeline", sync=torch.cuda.synchronize)


# ------------------------------------------------------------------------------ image-folder decode

DECODE = "speed decode image folder"
DECODE_N = 400


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """<root>/train/<class>/*.JPEG: DECODE_N CIFAR (or shapes) images upscaled to 400x300, quality 90,
    the size and format of ImageNet files."""
    from PIL import Image
    images, labels = _images()
    root = tmp_path_factory.mktemp("in100")
    for i in range(DECODE_N):
        d = root / "train" / f"n{int(labels[i]):08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).resize((400, 300), Image.BICUBIC).save(d / f"{i}.JPEG", quality=90)
    return root


def _time_decode(benchmark, root, name, baseline=False, **kw):
    from aerl_fast.data.imagefolder import load_image_folder
    threads = torch.get_num_threads()
    run = lambda: load_image_folder(root, "train", size=32, cache=False, num_threads=threads, **kw)  # noqa: E731
    assert run().images.shape == (DECODE_N, 32, 32, 3)  # warm-up (DALI's import and first pipeline)
    benchmark.pedantic(run, rounds=3, iterations=1)
    record(benchmark, DECODE, name, benchmark.stats.stats.min / DECODE_N, "image", baseline=baseline)
    benchmark.extra_info["images_per_s"] = round(DECODE_N / benchmark.stats.stats.min)


def test_decode_pil(benchmark, jpeg_tree):
    _time_decode(benchmark, jpeg_tree, "Pillow threads (--decoder pil)", baseline=True, decoder="pil")


@needs_dali
def test_decode_dali_cpu(benchmark, jpeg_tree):
    _time_decode(benchmark, jpeg_tree, "DALI CPU (--decoder dali, --device cpu)", decoder="dali", device="cpu")


@needs_cuda
@needs_dali
def test_decode_dali_gpu(benchmark, jpeg_tree):
    _time_decode(benchmark, jpeg_tree, "DALI mixed / nvJPEG (--decoder dali, --device cuda)", decoder="dali",
                 device="cuda")


# -------------------------------------------------------------------------------- trainer overhead

OVERHEAD = "trainer overhead"
STEPS, BATCH = 24, 64


def _trainer(model="alicnn", width=0.5, device="cpu"):
    """A Trainer on the embedded dataset with STEPS full training batches (drop_last), uncompiled
    (the bare step it is compared with is not compiled either)."""
    from aerl_fast.config import RunOptions, TrainConfig
    from aerl_fast.train import Trainer
    cfg = TrainConfig(dataset="shapes", model=model, width=width, objective="rl", batch_size=BATCH,
                      train_subset=STEPS * BATCH + BATCH // 2).validate()
    options = RunOptions(progress=False, checkpoint_minutes=0, device=device, loader="tensor", compile=False)
    trainer = Trainer(cfg, options, Path(tempfile.mkdtemp(prefix="aerl_bench_")), log=lambda m: None)
    assert len(trainer.loader) == STEPS, f"{len(trainer.loader)} batches, expected {STEPS}"
    return trainer


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def overhead_setup(request):
    from aerl_fast.checkpoint import build_from_spec
    trainer = _trainer(device=request.param)
    batches = list(trainer.loader.epoch(0))
    bare = build_from_spec(trainer.spec)
    bare.load_state_dict(trainer.model.state_dict())
    if runtime.prefers_channels_last(trainer.device):  # the trainer's layout: the same work, bare
        bare = bare.to(memory_format=torch.channels_last)
    bare.train()
    opt = torch.optim.AdamW(bare.parameters(), lr=trainer.cfg.lr, weight_decay=trainer.cfg.weight_decay, fused=True)
    return trainer, bare, opt, batches


def test_overhead_bare_step(benchmark, overhead_setup):
    _, model, opt, batches = overhead_setup

    def run():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, f"{OVERHEAD} {batches[0][0].device.type}", f"bare forward+backward+AdamW ({STEPS} batches of "
           f"{BATCH}, alicnn w0.5)", benchmark.stats.stats.min / STEPS, "step", baseline=True)


def test_overhead_trainer_epoch(benchmark, overhead_setup):
    from aerl_fast.progress import bar_factory
    trainer = overhead_setup[0]
    bars = bar_factory(False, unit="batch")

    def run():
        trainer.step = 0
        trainer.progress = trainer._empty_progress()
        trainer.train_epoch(bars)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    per_step = benchmark.stats.stats.min / STEPS
    group = f"{OVERHEAD} {trainer.device.type}"
    record(benchmark, group, "Trainer.train_epoch (loader + RL objective + AdamW + bookkeeping)", per_step, "step")
    base = baseline_of(group)
    if base:
        ratio = per_step / base
        benchmark.extra_info["overhead_ratio"] = round(ratio, 3)
        print(f"[{group}] trainer / bare = {ratio:.3f}  (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")


# -------------------------------------------------------------------------------------- GPU steps

@needs_cuda
@pytest.mark.parametrize("variant", ["eager fp32", "compiled bf16 channels_last"])
def test_step_cuda_cnn6(benchmark, variant):
    from aerl_fast.models import build_model
    from aerl_fast.objectives import ObjectiveConfig, train_step
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = build_model("cnn6", 10, width=1.0).to(dev).train()
    x = torch.rand(256, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (256,), device=dev)
    autocast, fwd = None, model
    if variant != "eager fp32":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        autocast, fwd = torch.autocast("cuda", dtype=torch.bfloat16), torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cfg, gen = ObjectiveConfig("rl"), torch.Generator(device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(fwd, x, y, cfg, adv_active=False, generator=gen, autocast=autocast)
        opt.step()

    def run():
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()  # compiles
    benchmark.extra_info["first_run_s"] = round(time.perf_counter() - t0, 2)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, "step cuda cnn6 w1 b256", variant, benchmark.stats.stats.min / 20, "step",
            baseline=variant == "eager fp32")
    benchmark.extra_info["images_per_s"] = round(256 * 20 / benchmark.stats.stats.min)

