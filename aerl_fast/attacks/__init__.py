"""White-box and score-based attacks on models taking inputs in [0, 1], AutoAttack's cascade, and
the transfer matrix.  Norm names: "linf"/"l2", or "Linf"/"L2" as AutoAttack spells them.

Functional:  pgd(model, x, y, eps=, step=, steps=, norm="linf"|"l2", random_start=True,
                 early_stop=False, clamp=True, seed=)      -> adversarial images
             fgsm(model, x, y, eps=, norm=)                 -> adversarial images
Objects:     FGSM(model, eps=..)(images, labels), PGD(..), PGDL2(..)   (torchattacks-like)
APGD:        apgd(model, x, y, eps=, norm=, steps=100, loss="ce"|"dlr", targets=0, seed=0,
                  sample_ids=, budget="full", amp=False)    -> APGDResult(x_adv, fooled,
                                                               forwards, backwards)
             targets=9 with loss="dlr" is AutoAttack's APGD-T.
Square:      square(model, x, y, eps=, norm=, queries=5000, p_init=0.8, seed=0, sample_ids=,
                    budget="full")                           -> SquareResult(x_adv, fooled, forwards)
Cascade:     autoattack_fast(model, x, y, eps=, norm=, seed=0, stages=("apgd-ce", "apgd-t",
                    "square"), budget="fast"|"full", batch_size=500, sample_ids=, amp=False)
                 -> AutoAttackFastResult(.robust, .clean, .broken_by, .forwards, .backwards,
                    .stages [StageReport], .disagreements, .x_adv, .summary())
             autoattack_fast_sharded(model, x, y, dist=DistContext, eps=, norm=, ...)
                 -> the merged result on rank 0 (None elsewhere), equal to one process's
             StallRule: budget="fast"'s rule (module `budget`); STAGES, STANDARD: stage names.
AutoAttack:  autoattack(model, x, y, eps=, norm=, version=)  (optional extra pyautoattack)
Transfer:    transfer_matrix({name: model}, x, y, attack)   -> N x N accuracies
Checks:      check_model(model, x): logits, determinism, training mode (autoattack_fast runs it).

pgd, fgsm, apgd, square and autoattack_fast attack a channels_last copy of a convolutional model
(`runtime.fast_eval_copy`); the caller's module is never changed.
"""
from ._common import (AttackError, AttackWarning, LOSSES, NORMS, attack_loss, attack_mode,
                      check_norm, dlr_loss, fooled_by, margin)
from .aa_fast import STAGES, STANDARD, AutoAttackFastResult, StageReport, autoattack_fast
from .aa_shard import autoattack_fast_sharded
from .api import FGSM, PGD, PGDL2, Attack
from .apgd_attack import APGDResult, apgd
from .auto import AutoAttackMissing, AutoAttackResult, autoattack, autoattack_available, load_autoattack
from .budget import BUDGETS, StallRule
from .gradient import AttackResult, fgsm, pgd
from .model_checks import check_model
from .square_attack import SquareResult, square
from .transfer import TransferError, TransferResult, check_same_classes, num_classes, transfer_matrix

__all__ = [
    "APGDResult", "Attack", "AttackError", "AttackResult", "AttackWarning", "AutoAttackFastResult",
    "AutoAttackMissing", "AutoAttackResult", "BUDGETS", "FGSM", "LOSSES", "NORMS", "PGD", "PGDL2",
    "STAGES", "STANDARD", "SquareResult", "StageReport", "StallRule", "TransferError",
    "TransferResult", "apgd", "attack_loss", "attack_mode", "autoattack", "autoattack_available",
    "autoattack_fast", "autoattack_fast_sharded", "check_model", "check_norm",
    "check_same_classes", "dlr_loss", "fgsm", "fooled_by", "load_autoattack", "margin",
    "num_classes", "pgd", "square", "transfer_matrix",
]
