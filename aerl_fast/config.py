"""What is trained (`TrainConfig`) and how this process runs it (`RunOptions`), and the presets.

TrainConfig is the experiment: data, model, objective, optimisation, seed.  config.json, the
checkpoint and `--resume`'s comparison hold it, and a resumed run may change none of it except the
fields marked resumable (`epochs`, and a lower `lr` after a divergence), each change recorded in
config.json's `resume_history`.  RunOptions is how one process runs it (device, precision,
compilation, loaders, progress, output folder, checkpoint timing): any of them may differ on
resume.  Precedence: dataclass defaults < preset file < flags given on the command line.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Optional

from aerl_fast.data import DATASETS
from aerl_fast.data.backends import LOADERS
from aerl_fast.data.cifar import LABEL_SETS
from aerl_fast.data.imagefolder import DECODERS
from aerl_fast.data.loader import PAD_MODES
from aerl_fast.errors import ConfigError
from aerl_fast.fields import check, from_mapping, setting
from aerl_fast.kernels.pg_loss import EXPLORE_MODES
from aerl_fast.models import MODELS
from aerl_fast.objectives import OBJECTIVES, ObjectiveConfig
from aerl_fast.optim import SCHEDULES

D, M, O, P = "data", "model", "objective", "optimisation"


@dataclass
class TrainConfig:
    dataset: str = setting("shapes", "shapes (embedded, generated from the seed), cifar10, cifar100, imagenet100 "
                           "(image-folder tree or .npz), npz (the study's X_train/y_train/X_test/y_test file)",
                           choices=DATASETS, group=D)
    data_dir: Optional[str] = setting(None, "folder holding the dataset (cifar-10-batches-py/ or cifar-10-python.tar.gz, "
                                      "...), or the .npz file; default $AERL_FAST_DATA or ./data", group=D)
    labels: str = setting("fine", "CIFAR-100 label set: fine (100 classes) or coarse (20)", choices=LABEL_SETS, group=D)
    image_size: int = setting(32, "side length images are resized to (image-folder ImageNet-100)", lo=8, hi=1024, group=D)
    val_frac: float = setting(0.1, "fraction of the training set held out, stratified, for validation/best checkpoint",
                              lo=0.0, hi=1.0, hi_open=True, group=D)
    split_seed: int = setting(42, "seed of the stratified train/validation split (the study: 42)", lo=0, group=D)
    train_subset: int = setting(0, "use only this many training images (stratified; 0 = all)", lo=0, group=D)
    hflip: bool = setting(True, "random horizontal flip", group=D)
    vflip: bool = setting(True, "random vertical flip", group=D)
    translate: float = setting(0.1, "random translation, as a fraction of the image size", lo=0.0, hi=0.5,
                               hi_open=True, group=D)
    pad_mode: str = setting("zeros", "fill of pixels vacated by translation", choices=PAD_MODES, group=D)
    model: str = setting("alicnn", "cnn6 (the study's 6-layer CNN), alicnn, resnet18 (CIFAR), resnet50, densenet121",
                         choices=tuple(MODELS), group=M)
    width: float = setting(0.5, "channel width multiplier (1.0 = the study's)", lo=0.0, lo_open=True, hi=16.0, group=M)
    objective: str = setting("rl", f"training objective: {', '.join(OBJECTIVES)}", choices=OBJECTIVES, group=O)
    explore_eps: float = setting(0.1, "ε of ε-greedy exploration (RL), in [0, 1]", group=O)
    explore: str = setting("sample", f"exploration coin per sample (textbook) or per batch (the study's code): "
                           f"{' or '.join(EXPLORE_MODES)}", group=O)
    prob_floor: float = setting(0.0, "probability floor added to the softmax, renormalised (the study: 1e-6)", group=O)
    adv_eps: float = setting(0.01, "FGSM ε of the adversarial term, in [0,1] pixel units", group=O)
    adv_beta: float = setting(1.0, "weight β of the adversarial term: total = L(x) + β·L(x_adv)", group=O)
    adv_start_epoch: int = setting(0, "first epoch (0-based) with the adversarial term (the study: 400 of 600 for RL)",
                                   lo=0, group=O)
    epochs: int = setting(6, "training epochs (may be raised on --resume)", lo=1, hi=1_000_000, group=P,
                          resumable=True)
    batch_size: int = setting(64, "global training batch size (split evenly over torchrun processes)", lo=1,
                              hi=1 << 20, group=P)
    lr: float = setting(1e-3, "AdamW learning rate (may be lowered on --resume, e.g. after a divergence)",
                        lo=0.0, lo_open=True, group=P, resumable=True)
    weight_decay: float = setting(1e-2, "AdamW weight decay", lo=0.0, group=P)
    schedule: str = setting("constant", "learning-rate schedule per step: constant, warmup-linear (warm-up then "
                            "linear decay to --final-lr-frac), cosine", choices=SCHEDULES, group=P)
    warmup_epochs: float = setting(0.0, "linear warm-up length in epochs", lo=0.0, group=P)
    final_lr_frac: float = setting(0.1, "final learning rate as a fraction of --lr (warmup-linear, cosine)",
                                   lo=0.0, hi=1.0, group=P)
    grad_clip: float = setting(0.0, "clip the global gradient norm to this value (0 = off)", lo=0.0, group=P)
    seed: int = setting(0, "seed of initialisation, shuffling, augmentation, exploration and the embedded dataset",
                        lo=0, group=P)

    def validate(self) -> "TrainConfig":
        """Types, finiteness and ranges of every field (ConfigError naming the flag), then the
        objective's own ranges, checked in one place (ObjectiveConfig)."""
        check(self)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs:g} exceeds --epochs {self.epochs}")
        try:
            self.objective_config()
        except ValueError as exc:  # "adv_eps must be >= 0, ..." -> "--adv-eps must be >= 0, ..."
            field, _, rest = str(exc).partition(" ")
            raise ConfigError(f"--{field.replace('_', '-')} {rest}") from None
        return self

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(self.objective, self.explore_eps, self.explore, self.prob_floor,
                               self.adv_eps, self.adv_beta)

    def to_json(self) -> dict:
        return asdict(self)


R = "runtime"


@dataclass
class RunOptions:
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", group=R)
    amp: bool = setting(False, "bf16 autocast (CUDA, or a CPU with native bf16; otherwise fp32 with a notice)", group=R)
    compile: Optional[bool] = setting(None, "torch.compile the model (default: on for CUDA, off for CPU)", group=R)
    loader: str = setting("auto", "training data loader: tensor (device-resident, batched gather), dali (NVIDIA "
                          "DALI pipeline; pip install \"aerl_fast[dali]\"), or auto (tensor unless the set does not "
                          "fit on the GPU)", choices=LOADERS, group=R)
    decoder: str = setting("auto", "image-folder decoder (decoded once, then cached): pil (Pillow threads), dali "
                           "(NVIDIA DALI: nvJPEG when --device is CUDA, its CPU decoder otherwise), or auto (DALI "
                           "when installed, else Pillow)", choices=DECODERS, group=R)
    download: bool = setting(False, "fetch CIFAR from its official address when it is missing (needs network)", group=R)
    eval_batch_size: int = setting(1024, "batch size of validation/test evaluation", lo=1, hi=1 << 20, group=R)
    checkpoint_minutes: float = setting(10.0, "also checkpoint mid-epoch every this many minutes (0 = epoch ends only)",
                                        lo=0.0, group=R)
    save_every: int = setting(0, "also keep a checkpoint every N epochs as epoch_NNNN.pt (0 = off)", lo=0, group=R)
    out: Optional[str] = setting(None, "run folder (default runs/<dataset>-<model>-<objective>-<time>)", group=R)
    overwrite: bool = setting(False, "allow writing into an existing run folder (one that holds a run of ours)", group=R)
    progress: bool = setting(True, "show progress bars", group=R)

    def validate(self) -> "RunOptions":
        return check(self)

    def to_json(self) -> dict:
        return asdict(self)


TRAIN_KEYS = frozenset(f.name for f in fields(TrainConfig))
OPTION_KEYS = frozenset(f.name for f in fields(RunOptions))
# what config.json holds beside the TrainConfig keys; files written before the split held the options
# (and "preset") at the top level: they are read and set aside, never compared on resume
CONFIG_JSON_EXTRAS = frozenset({"run_options", "resume_history", "kernel_fallbacks", "preset"}) | OPTION_KEYS


def split_values(values: dict, where: str) -> tuple:
    """(TrainConfig values, RunOptions values) of one flat mapping (a preset, an old config.json);
    unknown keys are an error naming `where`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(values).__name__}")
    values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys
    unknown = sorted(set(values) - TRAIN_KEYS - OPTION_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return ({k: v for k, v in values.items() if k in TRAIN_KEYS},
            {k: v for k, v in values.items() if k in OPTION_KEYS})


def read_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid JSON (nested too deeply)") from None


def config_from_json(values: dict, where: str) -> TrainConfig:
    """The TrainConfig of a config.json or checkpoint `config` (either format), checked."""
    cfg = from_mapping(TrainConfig, values, where, ignore=CONFIG_JSON_EXTRAS)
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def preset_names():
    return sorted(p.name[:-5] for p in resources.files("aerl_fast.configs").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """Values of a training preset by name (configs/NAME.json) or path, every key and value checked
    against TrainConfig/RunOptions (the error names the file and the key)."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        res = resources.files("aerl_fast.configs") / f"{name}.json"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
        text, where = res.read_text(), f"configs/{name}.json"
    train, options = split_values(read_json(text, where), where)
    from_mapping(TrainConfig, train, where)  # types and ranges of each key, named
    from_mapping(RunOptions, options, where)
    return {**train, **options}
