"""The one attack module: PGD with pluggable objectives, and the AutoAttack adapter."""

from bench.attacks.pgd import pgd, ce_objective, kl_objective, attack_classifier, eval_guard, eval_mode, frozen_parameters

__all__ = ["pgd", "ce_objective", "kl_objective", "attack_classifier", "eval_guard", "eval_mode", "frozen_parameters"]
