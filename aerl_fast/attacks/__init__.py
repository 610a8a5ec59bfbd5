"""White-box attacks on models taking inputs in [0, 1], and the transfer matrix.

Functional:  pgd(model, x, y, eps=, step=, steps=, norm="linf"|"l2", random_start=True,
                 early_stop=False, clamp=True, seed=)      -> adversarial images
             fgsm(model, x, y, eps=, norm=)                 -> adversarial images
Objects:     FGSM(model, eps=..)(images, labels), PGD(..), PGDL2(..)   (torchattacks-like)
AutoAttack:  autoattack(model, x, y, eps=, norm=, version=)  (optional extra pyautoattack)
Transfer:    transfer_matrix({name: model}, x, y, attack)   -> N x N accuracies
"""
from ._common import AttackError, LOSSES, NORMS, attack_loss, attack_mode, fooled_by
from .api import FGSM, PGD, PGDL2, Attack
from .auto import AutoAttackMissing, AutoAttackResult, autoattack, autoattack_available, load_autoattack
from .gradient import AttackResult, fgsm, pgd
from .transfer import TransferError, TransferResult, check_same_classes, num_classes, transfer_matrix

__all__ = [
    "Attack", "AttackError", "AttackResult", "AutoAttackMissing", "AutoAttackResult", "FGSM",
    "LOSSES", "NORMS", "PGD", "PGDL2", "TransferError", "TransferResult", "attack_loss",
    "attack_mode", "autoattack", "autoattack_available", "check_same_classes", "fgsm", "fooled_by",
    "load_autoattack", "num_classes", "pgd", "transfer_matrix",
]
