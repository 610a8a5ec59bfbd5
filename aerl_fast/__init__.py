"""aerl_fast: fast training and robustness evaluation of RL-trained image classifiers.

Public API:
    load_model(path)                      trained nn.Module from a run folder or checkpoint (eval mode,
                                          inputs in [0,1])
    load_dataset(name, data_dir, split)   uint8 images [N,H,W,3] and int64 labels
"""
__version__ = "0.1.0"


def load_model(path, device="cpu"):
    from .checkpoint import load_model as _load_model
    return _load_model(path, device=device)


def load_dataset(name, data_dir=None, split="train", **kwargs):
    from .data import load_dataset as _load_dataset
    return _load_dataset(name, data_dir, split, **kwargs)


__all__ = ["load_model", "load_dataset", "__version__"]
