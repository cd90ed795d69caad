"""AIR on ACL and DynACL (Xu et al., NeurIPS 2023), per ../shared/spec/methods/air_rcs.md A.

The regularizers are options of `acl` and `dynacl` (`air_lambda1`, `air_lambda2`, `air_kl`;
`methods.air_loss`); these registered variants set them as the released code does
(`GodXuxilie/Enhancing_ACL_via_AIR@15cf0a7`): lambda1 = lambda2 = 0.5 ("IR", the published
ACL-AIR / DynACL-AIR), the un-halved sum, no drop_last, LARS with the lr in its momentum buffer,
the scheduler stepped before each forward and an unclipped attack start.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.config import param
from bench.registry import METHODS
from methods.acl import ACL
from methods.dynacl import IMPLS, LPAFT_INIT_HELP, LPAFT_K_HELP, DynACL, LPAFTMixin


@METHODS.register("acl_air")
class ACLAIR(ACL):
    """ACL-AIR: ACL plus AIR's invariance regularizers (SIR and AIR, 0.5 each)."""

    @dataclass
    class Config(ACL.Config):
        air_lambda1: float = param(0.5, min=0.0, help="weight of SIR")
        air_lambda2: float = param(0.5, min=0.0, help="weight of AIR")
        loss_halved: bool = param(False, help="the AIR code sums the terms (no / 2)")

    drop_last = False  # pretraining.py:130-134


@METHODS.register("dynacl_air")
class DynACLAIR(DynACL):
    """DynACL-AIR: the AIR release's EMA-free DynACL (impl=air) plus SIR and AIR (0.5 each)."""

    @dataclass
    class Config(DynACL.Config):
        impl: str = param("air", choices=IMPLS, help="air: the AIR release's own DynACL (its published numbers); "
                                                     "pku: the same terms on PKU-ML/DYNACL (EMA)")
        air_lambda1: float = param(0.5, min=0.0, help="weight of SIR")
        air_lambda2: float = param(0.5, min=0.0, help="weight of AIR")


@METHODS.register("dynacl_air_pp")
class DynACLAIRPP(LPAFTMixin, DynACLAIR):
    """DynACL-AIR++: DynACL-AIR, then LP-AFT on k-means pseudo-labels."""

    pretrain_as = "dynacl_air"

    @dataclass
    class Config(DynACLAIR.Config):
        lpaft_k: str = param("10", help=LPAFT_K_HELP)
        lpaft_trades_init: str = param("x", choices=("x", "normal"), help=LPAFT_INIT_HELP)
