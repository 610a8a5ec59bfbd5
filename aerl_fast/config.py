"""Training configuration: one dataclass, its CLI, and the presets in configs/*.json.

Precedence: dataclass defaults < --preset file < flags given on the command line.  A preset with an
unknown key or an out-of-range value is rejected before anything starts.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Optional

from aerl_fast.errors import ConfigError

SCHEDULES = ("constant", "warmup-linear", "cosine")
LOADERS = ("auto", "tensor", "dali")  # --loader; chosen by aerl_fast.data.backends.choose_loader
DECODERS = ("auto", "pil", "dali")    # --decoder; chosen by aerl_fast.data.imagefolder.choose_decoder


@dataclass
class TrainConfig:
    # data
    dataset: str = "shapes"
    data_dir: Optional[str] = None
    labels: str = "fine"
    image_size: int = 32
    decoder: str = "auto"
    val_frac: float = 0.1
    split_seed: int = 42
    train_subset: int = 0
    download: bool = False
    hflip: bool = True
    vflip: bool = True
    translate: float = 0.1
    pad_mode: str = "zeros"
    # model
    model: str = "alicnn"
    width: float = 0.5
    # objective
    objective: str = "rl"
    explore_eps: float = 0.1
    explore: str = "sample"
    prob_floor: float = 0.0
    adv_eps: float = 0.01
    adv_beta: float = 1.0
    adv_start_epoch: int = 0
    # optimisation
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    final_lr_frac: float = 0.1
    grad_clip: float = 0.0
    seed: int = 0
    # runtime
    device: str = "auto"
    amp: bool = False
    compile: Optional[bool] = None
    loader: str = "auto"
    eval_batch_size: int = 1024
    checkpoint_minutes: float = 10.0
    save_every: int = 0
    out: Optional[str] = None
    overwrite: bool = False
    progress: bool = True
    preset: Optional[str] = None

    def validate(self) -> "TrainConfig":
        from aerl_fast.data import DATASETS
        from aerl_fast.models import MODELS
        from aerl_fast.objectives import OBJECTIVES
        checks = [
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}"),
            (self.model in MODELS, f"--model must be one of {', '.join(MODELS)}, got {self.model!r}"),
            (self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"),
            (self.loader in LOADERS, f"--loader must be one of {', '.join(LOADERS)}, got {self.loader!r}"),
            (self.decoder in DECODERS, f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.labels in ("fine", "coarse"), f"--labels must be fine or coarse, got {self.labels!r}"),
            (self.pad_mode in ("zeros", "reflect", "replicate"), f"--pad-mode must be zeros, reflect or replicate, got {self.pad_mode!r}"),
            (self.width > 0, f"--width must be > 0, got {self.width}"),
            (self.adv_start_epoch >= 0, f"--adv-start-epoch must be >= 0, got {self.adv_start_epoch}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0.0 <= self.final_lr_frac <= 1.0, f"--final-lr-frac must be in [0, 1], got {self.final_lr_frac}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (0.0 <= self.val_frac < 1.0, f"--val-frac must be in [0, 1), got {self.val_frac}"),
            (0.0 <= self.translate < 0.5, f"--translate must be in [0, 0.5), got {self.translate}"),
            (self.train_subset >= 0, f"--train-subset must be >= 0, got {self.train_subset}"),
            (self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
            (self.checkpoint_minutes >= 0, f"--checkpoint-minutes must be >= 0, got {self.checkpoint_minutes}"),
            (self.save_every >= 0, f"--save-every must be >= 0 (0 = off), got {self.save_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:  # the objective's own ranges, checked in one place (ObjectiveConfig)
            self.objective_config()
        except ValueError as exc:  # "adv_eps must be >= 0, ..." -> "--adv-eps must be >= 0, ..."
            field, _, rest = str(exc).partition(" ")
            raise ConfigError(f"--{field.replace('_', '-')} {rest}") from None
        return self

    def objective_config(self):
        from aerl_fast.objectives import ObjectiveConfig
        return ObjectiveConfig(self.objective, self.explore_eps, self.explore, self.prob_floor,
                               self.adv_eps, self.adv_beta)

    def to_json(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}

HELP = {
    "dataset": "shapes (embedded, generated from the seed), cifar10, cifar100, imagenet100 (image-folder tree or .npz), npz (the study's X_train/y_train/X_test/y_test file)",
    "data_dir": "folder holding the dataset (cifar-10-batches-py/ or cifar-10-python.tar.gz, ...), or the .npz file; default $AERL_FAST_DATA or ./data",
    "labels": "CIFAR-100 label set: fine (100 classes) or coarse (20)",
    "image_size": "side length images are resized to (image-folder ImageNet-100)",
    "decoder": "image-folder decoder (decoded once, then cached): pil (Pillow threads), dali (NVIDIA DALI: nvJPEG "
               "when --device is CUDA, its CPU decoder otherwise; pip install \"aerl_fast[dali]\"), or auto "
               "(DALI when installed, else Pillow)",
    "val_frac": "fraction of the training set held out, stratified, for validation/best checkpoint",
    "split_seed": "seed of the stratified train/validation split (the study: 42)",
    "train_subset": "use only this many training images (stratified; 0 = all)",
    "download": "fetch CIFAR from its official address when it is missing (needs network)",
    "hflip": "random horizontal flip",
    "vflip": "random vertical flip",
    "translate": "random translation, as a fraction of the image size",
    "pad_mode": "fill of pixels vacated by translation: zeros, reflect or replicate",
    "model": "cnn6 (the study's 6-layer CNN), alicnn, resnet18 (CIFAR), resnet50, densenet121",
    "width": "channel width multiplier (1.0 = the study's)",
    "objective": "sl, rl, sl-adv or rl-adv",
    "explore_eps": "ε of ε-greedy exploration (RL)",
    "explore": "exploration coin per sample (textbook) or per batch (the study's code)",
    "prob_floor": "probability floor added to the softmax, renormalised (the study: 1e-6)",
    "adv_eps": "FGSM ε of the adversarial term, in [0,1] pixel units",
    "adv_beta": "weight β of the adversarial term: total = L(x) + β·L(x_adv)",
    "adv_start_epoch": "first epoch (0-based) with the adversarial term (the study: 400 of 600 for RL)",
    "epochs": "training epochs",
    "batch_size": "global training batch size (split evenly over torchrun processes)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "schedule": "learning-rate schedule per step: constant, warmup-linear (warm-up then linear decay to final-lr-frac), cosine",
    "warmup_epochs": "linear warm-up length in epochs",
    "final_lr_frac": "final learning rate as a fraction of --lr (warmup-linear, cosine)",
    "grad_clip": "clip the global gradient norm to this value (0 = off)",
    "seed": "seed of initialisation, shuffling, augmentation, exploration and the embedded dataset",
    "device": "auto, cpu or cuda",
    "amp": "bf16 autocast (CUDA, or a CPU with native bf16; otherwise fp32 with a notice)",
    "compile": "torch.compile the model (default: on for CUDA, off for CPU)",
    "loader": "training data loader: tensor (device-resident, batched gather), dali (NVIDIA DALI pipeline; "
              "pip install \"aerl_fast[dali]\"), or auto (tensor unless the set does not fit on the GPU)",
    "eval_batch_size": "batch size of validation/test evaluation",
    "checkpoint_minutes": "also checkpoint mid-epoch every this many minutes (0 = epoch ends only)",
    "save_every": "also keep a checkpoint every N epochs as epoch_NNNN.pt (0 = off)",
    "out": "run folder (default runs/<dataset>-<model>-<objective>-<time>)",
    "overwrite": "allow writing into an existing run folder",
    "progress": "show progress bars",
    "preset": "a preset name from configs/ (e.g. cifar10-rl) or a path to a preset .json",
}


def preset_names():
    return sorted(p.name[:-5] for p in resources.files("aerl_fast.configs").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """Values of a preset by name (configs/NAME.json) or path; unknown keys are an error."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        res = resources.files("aerl_fast.configs") / f"{name}.json"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
        text, where = res.read_text(), f"configs/{name}.json"
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON ({exc})") from None
    values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_fast.train",
        description="Train an image classifier with SL, RL (ε-greedy REINFORCE), SL-adv or RL-adv.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        text = HELP[name] + f" (default: {default})"
        if name == "compile" or isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            typ = {"int": int, "float": float}.get(f.type, str)  # annotations are strings here
            p.add_argument(flag, type=typ, help=text, metavar=name.upper())
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint "
                   "(its config is kept; --epochs, --device, --amp, --compile, --progress may change)")
    return p


def parse_config(argv=None):
    """(TrainConfig, resume_dir or None, explicitly given keys) from the command line."""
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume", None)
    values = {}
    preset = args.get("preset")
    if preset:
        values.update(load_preset(preset))
    values.update(args)
    cfg = TrainConfig(**values)
    return cfg, resume, set(args)
