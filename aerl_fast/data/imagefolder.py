"""ImageNet-100 as an image-folder tree: <root>/train/<class>/*.JPEG and <root>/val/<class>/*.

Images are decoded once, resized (shorter side to `size`, bilinear, antialiased when shrinking) and
centre-cropped to `size`×`size` RGB, then cached beside the tree as an .npz when the folder is
writable, so later runs start instantly (`folder_cache`: keyed on every file's name, size and
times, rebuilt when they change).  An image whose header claims more than MAX_IMAGE_PIXELS is
refused before decoding.  Two decoders give the same uint8 [N,size,size,3] array:

- `pil`: Pillow in a thread pool, one image per task.
- `dali`: an NVIDIA DALI pipeline (`pip install "aerl_fast[dali]"`) fed the encoded file bytes in
  batches of 256 (`fn.external_source`, in the order of the file list): `fn.decoders.image` on
  device "mixed" (nvJPEG on the GPU) when the decode device is CUDA, else on "cpu" with the
  pipeline built with device_id=None (no CUDA call at all); `fn.resize` (linear, antialias) and a
  centre `fn.crop`; the batch is copied back to host uint8.  The next batch's files are read while
  DALI decodes.
- `auto` (default): DALI when it is installed, on CUDA and on the CPU alike; else Pillow.
  Measured on our CPU machine, one core (taskset), 1 decoding thread each, 400 JPEGs of 400×300
  smooth natural-looking content at quality 90, decoded to 32 px, median of 4 runs after a warm-up,
  twice: Pillow 870-890 img/s, DALI CPU 1130-1160 img/s (1.3×).  DALI's CPU decoder is libjpeg-turbo
  too (identical full-resolution pixels here) with less overhead per image: Pillow alone spends
  1.2 ms per image decoding and 1.6 ms with the resize, DALI 0.87 ms for both.  `import nvidia.dali`
  costs ~1.5 s once, paid only when a split is decoded, not when it comes from the cache.
The decode device is the training device (load_dataset's `decode_device`, from --device); None
means CUDA when available.

Same result from both: the resized size comes from one Python expression (`_resized_size`; DALI
gets it per sample as an explicit size, from the file header read by Pillow), EXIF orientation is
ignored by both, and the crop offset is floor((W - size) / 2) for both (`rounding="truncate"`).
Pixels then differ only by rounding inside the image (≤ 1 level measured: Pillow rounds its first
pass to uint8, DALI's intermediate is not rounded) and by the border treatment of the filter in the
outermost rows/columns (Pillow renormalises the taps that fall inside, DALI fills the outside from
the image): 1-3 levels there on smooth content, up to 13 on noisy 400×300 content shrunk to 32 px;
mean absolute difference 0.1-0.4 levels overall.  So the cache file name does not depend on the decoder:
a cache written by either serves both (the decoder that wrote it is recorded inside it).

A file neither decoder can read is a DatasetError naming it ("<path>: cannot decode image (...)").
DALI fails a whole batch, so a failed batch is decoded again one file at a time to find the file;
a file only DALI rejects (some format variant nvImageCodec does not handle) is decoded with Pillow
instead and named on stderr, and 8 such files in a row mean DALI itself is failing: an error.  The
cache is written only after every image is decoded.
"""
from __future__ import annotations

import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from aerl_fast.errors import ConfigError
from aerl_fast.limits import MAX_CLASSES, MAX_IMAGE_PIXELS

from .base import DatasetError, ImageSet, check_split
from .folder_cache import cache_path, fingerprint, read_cache, write_cache

DECODERS = ("auto", "pil", "dali")  # --decoder
EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}
DALI_BATCH = 256        # images per DALI pipeline run
PROGRESS_MIN = 2000     # no progress bar below this many images


# ----------------------------------------------------------------------------------- geometry

def _resized_size(w: int, h: int, size: int) -> Tuple[int, int]:
    """(width, height) after resizing the shorter side to `size` (the same expression for both decoders)."""
    s = size / min(w, h)
    return max(size, round(w * s)), max(size, round(h * s))


def _cannot_decode(path, exc) -> DatasetError:
    return DatasetError(f"{path}: cannot decode image ({exc})")


def _check_pixels(path, w: int, h: int):
    """Refuse, before decoding, an image whose header claims more pixels than any photo here has
    (a few-KB PNG can claim 30000×30000: 2.7 GB decoded)."""
    if w * h > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{path}: header claims {w}×{h} = {w * h} pixels, more than the "
                           f"{MAX_IMAGE_PIXELS} an image may have; refused before decoding")


# ------------------------------------------------------------------------------------------ PIL

def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:  # reads the header only
            _check_pixels(path, *im.size)
            im = im.convert("RGB")
            im = im.resize(_resized_size(*im.size, size), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _cannot_decode(path, exc) from None


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=total < PROGRESS_MIN, file=sys.stderr)


def _decode_pil(files: Sequence[Path], size: int, threads: int, desc: str) -> np.ndarray:
    images = np.empty((len(files), size, size, 3), np.uint8)
    with _progress(len(files), desc) as bar, ThreadPoolExecutor(max_workers=threads) as pool:
        for i, img in enumerate(pool.map(lambda f: _decode(f, size), files)):
            images[i] = img
            bar.update(1)
    return images


# ----------------------------------------------------------------------------------------- DALI

def _read_encoded(paths: Sequence[Path], size: int):
    """The encoded bytes of `paths` and each one's resized (height, width) from its header."""
    from PIL import Image, UnidentifiedImageError
    encoded, hw = [], []
    for p in paths:
        try:
            data = np.fromfile(p, dtype=np.uint8)
            with Image.open(io.BytesIO(data.tobytes())) as im:  # header only: no pixel is decoded
                w, h = im.size
        except UnidentifiedImageError:
            raise _cannot_decode(p, "not an image file Pillow can identify") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise _cannot_decode(p, exc) from None
        _check_pixels(p, w, h)
        rw, rh = _resized_size(w, h, size)
        encoded.append(data)
        hw.append(np.array([rh, rw], np.float32))
    return encoded, hw


class _DaliDecoder:
    """A DALI pipeline: encoded bytes + per-sample resized (H, W) -> uint8 [n, size, size, 3] on the host.

    device_id None: CPU decoding, no CUDA call at all; an int: nvJPEG ("mixed") on that GPU."""

    def __init__(self, batch_size: int, size: int, threads: int, device_id: Optional[int]):
        self.batch_size, self.size, self.threads, self.device_id = batch_size, size, threads, device_id
        self.pipe = None

    def build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        size, mixed = self.size, self.device_id is not None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                      prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            hw = fn.external_source(name="hw", dtype=types.FLOAT, ndim=1)
            # EXIF orientation is ignored, as the PIL path does; on the GPU, chroma is upsampled
            # like libjpeg-turbo (and Pillow) do on the CPU
            extra = {"jpeg_fancy_upsampling": True} if mixed else {}
            img = fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB,
                                    adjust_orientation=False, **extra)
            img = fn.resize(img, size=hw, antialias=True, interp_type=types.INTERP_LINEAR)
            return fn.crop(img, crop=(size, size), rounding="truncate")  # anchor floor((W - size) / 2)

        self.pipe = pipe()
        self.pipe.build()
        return self.pipe

    def run(self, encoded: List[np.ndarray], hw: List[np.ndarray]) -> np.ndarray:
        """Decode up to batch_size images; any decoding failure raises RuntimeError (DALI's).
        After a failure the pipeline is rebuilt before the next run."""
        if self.pipe is None:
            self.build()
        try:
            self.pipe.feed_input("encoded", encoded)
            self.pipe.feed_input("hw", hw)
            (out,) = self.pipe.run()
            if self.device_id is not None:
                out = out.as_cpu()
            return out.as_array()
        except RuntimeError:
            self.pipe = None  # DALI says a pipeline that raised is no longer valid
            raise


def _dali_error_line(exc: BaseException) -> str:
    """The cause line of a DALI pipeline error (the one after "encountered:"), else its first line."""
    lines = [ln.strip().rstrip(" :") for ln in str(exc).splitlines() if ln.strip()]
    for k, ln in enumerate(lines[:-1]):
        if ln.lower().startswith("encountered"):
            return lines[k + 1]
    return lines[0] if lines else type(exc).__name__


def _decode_dali(files: Sequence[Path], size: int, threads: int, desc: str, *,
                 device_id: Optional[int] = None, batch_size: int = DALI_BATCH) -> np.ndarray:
    n = len(files)
    images = np.empty((n, size, size, 3), np.uint8)
    decoder = _DaliDecoder(min(batch_size, n), size, threads, device_id)
    rejected = []  # files only PIL decodes
    streak = [0]   # DALI failures in a row, across batches
    # the next batch's files are read (and their headers parsed) while DALI decodes this one
    with _progress(n, desc) as bar, ThreadPoolExecutor(max_workers=1) as reader:
        say = lambda m: bar.write(m, file=sys.stderr)  # noqa: E731  (above the bar, not through it)
        pending = reader.submit(_read_encoded, files[:batch_size], size)
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            encoded, hw = pending.result()
            if hi < n:
                pending = reader.submit(_read_encoded, files[hi:hi + batch_size], size)
            try:
                images[lo:hi] = decoder.run(encoded, hw)  # the last batch may be smaller
            except RuntimeError:
                _salvage(decoder, files, lo, hi, encoded, hw, images, rejected, streak, say)
            else:
                streak[0] = 0
            bar.update(hi - lo)
    if len(rejected) > MAX_WARNINGS:
        print(f"warning: {len(rejected)} images DALI cannot decode were decoded with PIL "
              f"(first: {rejected[0]})", file=sys.stderr)
    return images


MAX_WARNINGS = 5        # files DALI rejects but PIL decodes: named one per line up to this many
MAX_CONSECUTIVE = 8     # ... and this many in a row means DALI itself is failing, not the files


def _salvage(decoder: _DaliDecoder, files, lo: int, hi: int, encoded, hw, images, rejected, streak, say):
    """A batch DALI failed on, decoded one file at a time: a file DALI cannot decode goes to PIL,
    which raises DatasetError naming it when it cannot decode it either."""
    for i in range(lo, hi):
        try:
            images[i] = decoder.run([encoded[i - lo]], [hw[i - lo]])[0]
            streak[0] = 0
            continue
        except RuntimeError as exc:
            error = _dali_error_line(exc)
        images[i] = _decode(files[i], size=images.shape[1])  # DatasetError naming the file if PIL fails too
        rejected.append(files[i])
        streak[0] += 1
        if streak[0] >= MAX_CONSECUTIVE:
            raise DatasetError(f"DALI failed on {streak[0]} images in a row that PIL decodes (last: "
                               f"{files[i]}: {error}); use --decoder pil")
        if len(rejected) <= MAX_WARNINGS:
            say(f"warning: {files[i]}: DALI cannot decode it ({error}); decoded with PIL")


# --------------------------------------------------------------------------------------- choice

class DecoderChoice(NamedTuple):
    name: str                 # "pil" or "dali"
    device_id: Optional[int]  # DALI: None = CPU pipeline, else the GPU decoding ("mixed")
    reason: str

    @property
    def label(self) -> str:
        if self.name == "pil":
            return "PIL"
        return "DALI CPU" if self.device_id is None else f"DALI mixed, cuda:{self.device_id}"


def _dali_ok() -> bool:
    from aerl_fast.data import dali
    return dali.dali_available()


def _check_decoder(name: str):
    if name not in DECODERS:
        raise ConfigError(f"--decoder must be one of {', '.join(DECODERS)}, got {name!r}")


def choose_decoder(requested: str = "auto", device=None, *, dali_ok: Optional[bool] = None) -> DecoderChoice:
    """The decoder for `requested` (auto|pil|dali) decoding for `device` (None/"auto": CUDA when
    available; "cpu"; "cuda[:N]").  Asks nothing of CUDA when `device` is "cpu" or PIL is requested."""
    _check_decoder(requested)
    if requested == "pil":
        return DecoderChoice("pil", None, "requested")
    if not (_dali_ok() if dali_ok is None else dali_ok):
        if requested == "dali":
            from aerl_fast.data.dali import INSTALL_HINT
            raise ConfigError(f"--decoder dali: {INSTALL_HINT}")
        return DecoderChoice("pil", None, "auto: DALI is not installed")
    dev = _resolve_device(device)
    if requested == "dali":
        return DecoderChoice("dali", dev, "requested")
    if dev is None:
        return DecoderChoice("dali", None, "auto: CPU, where DALI's CPU pipeline decodes ~1.3x faster than PIL")
    return DecoderChoice("dali", dev, "auto: CUDA, nvJPEG through DALI")


def _resolve_device(device) -> Optional[int]:
    """None for the CPU, else the CUDA device index."""
    name = "auto" if device is None else str(device)
    if name == "cpu":
        return None
    import torch
    if name == "auto":
        if not torch.cuda.is_available():
            return None
        name = "cuda"
    if name != "cuda" and not name.startswith("cuda:"):
        raise ConfigError(f"decode device must be auto, cpu or cuda[:N], got {name!r}")
    index = torch.device(name).index
    return torch.cuda.current_device() if index is None else int(index)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------- tree

def _class_dirs(split_dir: Path):
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir())


def _warn_empty_classes(split_dir: Path, classes, labels: np.ndarray):
    """A training class folder without images still becomes a class the model can never learn."""
    empty = [classes[c] for c in np.flatnonzero(np.bincount(labels, minlength=len(classes)) == 0)]
    if empty:
        print(f"aerl_fast: warning: {split_dir}: class folder(s) {', '.join(empty[:5])}"
              f"{' ...' if len(empty) > 5 else ''} hold no images; the model still gets "
              f"{len(classes)} classes", file=sys.stderr)


def load_image_folder(root, split: str = "train", size: int = 32, cache: bool = True, *,
                      decoder: str = "auto", device=None, num_threads: Optional[int] = None,
                      batch_size: int = DALI_BATCH) -> ImageSet:
    """One split of an image-folder tree as ImageSet(uint8 [N,size,size,3], int64 labels, classes).

    decoder: auto | pil | dali (see the module docstring); device: where DALI decodes (None: CUDA when
    available, "cpu", "cuda[:N]"); num_threads: decoding threads (default: the CPUs this process may
    use); batch_size: images per DALI run."""
    root = Path(root).expanduser()
    check_split(split)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    _check_decoder(decoder)  # checked even when the cache makes the decoder moot
    split_dir = next((root / d for d in SPLIT_DIRS[split] if (root / d).is_dir()), None)
    if split_dir is None:
        raise DatasetError(f"no image folder tree at {root}: expected {root}/train/<class>/*.JPEG and "
                           f"{root}/val/<class>/*.JPEG (or a 32×32 .npz file with X_train, y_train, X_test, y_test)")
    classes = _class_dirs(root / "train") if (root / "train").is_dir() else _class_dirs(split_dir)
    if not classes:
        raise DatasetError(f"{split_dir}: no class folders")
    if len(classes) > MAX_CLASSES:
        raise DatasetError(f"{split_dir.parent / 'train'}: {len(classes)} class folders, more than the "
                           f"{MAX_CLASSES} a dataset may have")
    split_classes = _class_dirs(split_dir)
    unknown = sorted(set(split_classes) - set(classes))
    if unknown:
        raise DatasetError(f"{split_dir}: class folder(s) {unknown[:5]} not present in {root / 'train'}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        d = split_dir / cls
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in EXTENSIONS and f.is_file():  # not a FIFO, device or folder
                files.append(f)
                labels.append(label)
    if not files:
        raise DatasetError(f"{split_dir}: no images ({', '.join(sorted(EXTENSIONS))})")
    y = np.asarray(labels, np.int64)
    if split == "train":
        _warn_empty_classes(split_dir, classes, y)
    # the name does not depend on the decoder: both give the same geometry and pixels up to rounding
    cached_at = cache_path(root, split_dir.name, size)
    key = fingerprint(root, files, y, size) if cache else ""
    if cache:
        images = read_cache(cached_at, key, y, size)
        if images is not None:
            return ImageSet(images, y, classes)
    choice = choose_decoder(decoder, device)
    threads = int(num_threads) if num_threads else _default_threads()
    desc = f"decoding {split_dir.name} ({choice.label})"
    if choice.name == "dali":
        images = _decode_dali(files, size, threads, desc, device_id=choice.device_id, batch_size=batch_size)
    else:
        images = _decode_pil(files, size, threads, desc)
    if cache:  # only now: every image decoded
        write_cache(cached_at, images, y, key, choice.label)
    return ImageSet(images, y, classes)
