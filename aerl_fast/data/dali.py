"""An NVIDIA DALI loader backend with the interface and guarantees of `DeviceLoader`.

    loader = DaliLoader(images, labels, 256, device="cuda", augment=Augment(), seed=0)
    for x, y in loader.epoch(epoch, start_step): ...   # x float [0,1] NCHW, y int64

Why it is built this way:
- The batch order is DeviceLoader's counter-based permutation of (seed, epoch), and each batch's
  augmentation parameters are drawn exactly as `augment_batch` draws them from (seed, epoch, step),
  both from CPU generators.
  DALI only executes them (flip, then a zero-padded slice for the translation, then the conversion
  to float); its own random operators are not used, because their state cannot be rewound to an
  arbitrary step.  So resuming at any (epoch, step) gives the batches an uninterrupted run sees, and
  the batches equal DeviceLoader's on any device (tests/test_dali.py checks it on the CPU).
- The uint8 batch is gathered on the host and fed through `fn.external_source` (batch mode);
  flags and anchors go in as per-sample argument inputs, which DALI requires on the host.
  On CUDA the images move to the GPU (`.gpu()`) and the ops run there; elsewhere the pipeline is
  built with `device_id=None`, which DALI accepts as CPU-only and which never touches a GPU.
- A fresh pipeline is built for each `epoch()` call (a few ms): nothing prefetched for an abandoned
  epoch can leak into the next one.

DALI is optional (`pip install "aerl_fast[dali]"`); importing this module works without it, and
`require_dali()` says how to install it.  Only zero fill is supported for the translation (DALI's
slice pads with a constant); `--pad-mode reflect/replicate` needs the tensor loader.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from aerl_fast.data.loader import Augment, EpochOrder, draw_augment
from aerl_fast.seeds import derived_seed


def dali_wheel() -> str:
    """The DALI package built for this torch's CUDA major (DALI publishes one per major: cuda120,
    cuda130); a CPU-only torch gets the CUDA 13 one, whose CPU pipelines need no GPU."""
    major = (torch.version.cuda or "13").split(".")[0]
    return f"nvidia-dali-cuda{major}0"


INSTALL_HINT = (f'DALI is not installed: pip install "aerl_fast[dali]" (the CUDA 13 build), or '
                f"pip install {dali_wheel()} (the build for this torch's CUDA)")


def dali_available() -> bool:
    """True when nvidia.dali and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at load time
        return False
    return True


def require_dali():
    if not dali_available():
        raise ImportError(INSTALL_HINT)


def augment_params(aug: Optional[Augment], b: int, h: int, w: int, generator: torch.Generator):
    """Per-sample (vflip, hflip, shift_y, shift_x) as int32 numpy arrays, from `draw_augment` (the
    one place every loader draws them), so both loaders see identical augmentations: flipped first,
    then shifted by (shift_y, shift_x) pixels (content moves down/right for positive shifts), zero fill."""
    if aug is None or not aug.active:
        zeros = np.zeros(b, np.int32)
        return zeros, zeros, zeros, zeros
    ty, tx, vf, hf = draw_augment(b, h, w, aug, generator)
    return tuple(t.numpy().astype(np.int32) for t in (vf, hf, ty, tx))


class DaliLoader(EpochOrder):
    """Batches of (float images in [0,1] NCHW, int64 labels) produced by a DALI pipeline.

    Same constructor, `epoch(epoch, start_step)`, `__len__`, `num_samples` and `order(epoch)` as
    DeviceLoader; `pipeline_device` is "cpu" (device_id=None) or "gpu"."""

    def __init__(self, images, labels, batch_size: int, *, device="cpu", shuffle: bool = True,
                 augment: Augment | None = None, drop_last: bool = False, seed: int = 0,
                 channels_last: bool = False, num_threads: int = 1, prefetch: int = 2):
        require_dali()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x = np.ascontiguousarray(np.asarray(images))
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N,H,W,C], got {x.dtype} {tuple(x.shape)}")
        y = np.array(labels, dtype=np.int64)
        if y.shape != (x.shape[0],):
            raise ValueError(f"{x.shape[0]} images but labels of shape {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty dataset: no images to load")
        if augment is not None and augment.translate > 0 and augment.pad_mode != "zeros":
            raise ValueError(f"the DALI loader fills translated pixels with zeros only; pad_mode "
                             f"{augment.pad_mode!r} needs the tensor loader (--loader tensor)")
        self.device = torch.device(device)
        self.images, self.labels = x, y          # host uint8 NHWC: DALI gathers nothing itself
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.seed, self.channels_last = int(seed), channels_last
        self.num_threads, self.prefetch = int(num_threads), int(prefetch)
        self.pipeline_device = "gpu" if self.device.type == "cuda" else "cpu"
        self._aug_gen = torch.Generator()  # argument inputs live on the host, whatever the device

    @property
    def device_id(self) -> Optional[int]:
        """DALI's device_id: None builds a CPU-only pipeline (no CUDA call at all)."""
        if self.pipeline_device == "cpu":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def build_pipeline(self, source):
        """The DALI pipeline fed by `source()` -> (images, labels[, vflip, hflip, anchor]) batches."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        h, w = self.images.shape[1:3]
        aug = self.augment is not None and self.augment.active

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch, seed=self.seed)
        def pipe():
            n = 5 if aug else 2  # no augmentation: the source yields (images, labels) only
            img, lab, *params = fn.external_source(
                source=source, num_outputs=n, batch=True, parallel=False, layout=["HWC"] + [""] * (n - 1),
                dtype=[types.UINT8, types.INT64, types.INT32, types.INT32, types.INT32][:n])
            if self.pipeline_device == "gpu":
                img, lab = img.gpu(), lab.gpu()
            if aug:
                vf, hf, anchor = params
                img = fn.flip(img, vertical=vf, horizontal=hf)
                img = fn.slice(img, anchor, np.array([h, w], np.int32), axis_names="HW",
                               normalized_anchor=False, normalized_shape=False,
                               out_of_bounds_policy="pad", fill_values=0)
            # x / 255 as a true float32 division, bit for bit the tensor loader's (crop_mirror_normalize
            # multiplies by 1/255, up to 1 ulp off); HWC viewed as NCHW is channels_last memory at no
            # cost, CHW is contiguous NCHW
            img = fn.cast(img, dtype=types.FLOAT) / np.float32(255.0)
            if not self.channels_last:
                img = fn.transpose(img, perm=[2, 0, 1], output_layout="CHW")
            return img, lab

        return pipe()

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`, starting at batch `start_step` (for mid-epoch resume)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        steps = len(self)
        if start_step >= steps:
            return
        order = self.host_order(epoch).numpy()
        h, w = self.images.shape[1:3]
        state = {"step": start_step}

        def source():
            step = state["step"]
            if step >= steps:
                raise StopIteration
            state["step"] = step + 1
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            if not (self.augment is not None and self.augment.active):
                return self.images[idx], self.labels[idx]
            self._aug_gen.manual_seed(derived_seed(self.seed, epoch, step, 1))
            vf, hf, ty, tx = augment_params(self.augment, len(idx), h, w, self._aug_gen)
            anchor = np.stack([-ty, -tx], axis=1).astype(np.int32)  # out[r, c] = flipped[r - ty, c - tx]
            return self.images[idx], self.labels[idx], vf, hf, anchor

        it = DALIGenericIterator(self.build_pipeline(source), ["x", "y"], auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        for out in it:
            x, y = out[0]["x"], out[0]["y"]
            x = x.permute(0, 3, 1, 2) if self.channels_last else x
            yield x, y.to(self.device, non_blocking=True)

    def __iter__(self):
        return self.epoch(0)
