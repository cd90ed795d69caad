"""The ACL family's loss: weighted clean and adversarial NT-Xent plus AIR's invariance terms.

air_rcs.md A.3 (`GodXuxilie/Enhancing_ACL_via_AIR@15cf0a7 AIR.py:15-101`):

    L = kappa [ (1 - w) NAT + (1 + w) ADV + lambda1 SIR + lambda2 AIR ]

NAT/ADV: NT-Xent of the clean / adversarial pair; w: DynACL's omega (0 for ACL); kappa = 1/2
when `halved` (ACL, PKU DynACL), 1 in the AIR code. SIR and AIR compare softmaxes *over the batch
index* of matched-pair similarities (one value per image, not per pair of images):

    p_k = sm_k(a_k.o_k / t), q_k = sm_k(b_k.o_k / t)            (a, b clean views, o the original)
    P_k = sm_k(a~_k.o_k / t) sm_k(a~_k.a_k / t), Q_k likewise with b~, b (products, not renormalized)

`kl = "code"` computes what the released code computes, `F.kl_div` given probabilities where it
expects log-probabilities: SIR = sum q (log q - p), AIR = sum Q (log Q - P) (not KL divergences;
they can be negative). `kl = "textbook"`: SIR = KL(q || p), AIR = KL(Q/sum Q || P/sum P).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.losses import nt_xent

KL_FORMS = ("code", "textbook")


def matched_logits(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """u_k . v_k / t for each row k of two L2-normalized batches (the diagonal of u v^T / t)."""
    return (u * v).sum(dim=-1) / temperature


def invariance_terms(clean1: torch.Tensor, clean2: torch.Tensor, original: torch.Tensor, adv1: torch.Tensor,
                     adv2: torch.Tensor, temperature: float = 0.5, kl: str = "code"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(SIR, AIR) of B-row projections: clean views, un-augmented originals, adversarial views."""
    if kl not in KL_FORMS:
        raise ValueError(f"kl must be one of {KL_FORMS}, got {kl!r}")
    a, b, o, a_adv, b_adv = (F.normalize(z.float(), p=2, dim=-1) for z in (clean1, clean2, original, adv1, adv2))
    t = temperature
    if kl == "code":
        # F.kl_div(input, target, log_target=True) = sum exp(target) (target - input): the code
        # passes the probabilities p and P as `input` (AIR.py:82, :98)
        p = F.softmax(matched_logits(a, o, t), dim=-1)
        log_q = F.log_softmax(matched_logits(b, o, t), dim=-1)
        big_p = F.softmax(matched_logits(a_adv, o, t), -1) * F.softmax(matched_logits(a_adv, a, t), -1)
        big_q = F.softmax(matched_logits(b_adv, o, t), -1) * F.softmax(matched_logits(b_adv, b, t), -1)
        sir = F.kl_div(p, log_q, log_target=True, reduction="sum")
        air = F.kl_div(big_p, torch.log(big_q), log_target=True, reduction="sum")
        return sir, air
    log_p = F.log_softmax(matched_logits(a, o, t), dim=-1)
    log_q = F.log_softmax(matched_logits(b, o, t), dim=-1)
    log_big_p = F.log_softmax(matched_logits(a_adv, o, t), -1) + F.log_softmax(matched_logits(a_adv, a, t), -1)
    log_big_q = F.log_softmax(matched_logits(b_adv, o, t), -1) + F.log_softmax(matched_logits(b_adv, b, t), -1)
    sir = F.kl_div(log_p, log_q, log_target=True, reduction="sum")  # KL(q || p)
    log_q_hat = log_big_q - torch.logsumexp(log_big_q, dim=-1)
    log_p_hat = log_big_p - torch.logsumexp(log_big_p, dim=-1)
    return sir, F.kl_div(log_p_hat, log_q_hat, log_target=True, reduction="sum")  # KL(Q^ || P^)


def acl_family_loss(clean: torch.Tensor, adv: torch.Tensor, *, temperature: float = 0.5, omega: float = 0.0,
                    halved: bool = True, original: torch.Tensor | None = None, lambda1: float = 0.0,
                    lambda2: float = 0.0, kl: str = "code") -> dict[str, torch.Tensor]:
    """The loss of ACL, DynACL and their AIR variants; `clean` and `adv` are [view1; view2] rows.

    Without invariance weights this is ACL's (NAT + ADV) / 2 (omega 0, halved) or DynACL's
    ((1 - omega) NAT + (1 + omega) ADV) / 2; `original` (the B un-augmented images' projections)
    is needed only when lambda1 or lambda2 is non-zero.
    """
    c1, c2 = clean.chunk(2)
    a1, a2 = adv.chunk(2)
    nat, rob = nt_xent(c1, c2, temperature), nt_xent(a1, a2, temperature)
    total = (1 - omega) * nat + (1 + omega) * rob if omega else nat + rob
    out = {"clean_loss": nat, "adv_loss": rob}
    if lambda1 or lambda2:
        if original is None:
            raise ValueError("AIR terms need the originals' projections")
        sir, air = invariance_terms(c1, c2, original, a1, a2, temperature, kl)
        total = total + lambda1 * sir + lambda2 * air
        out.update(sir=sir.detach(), air=air.detach())
    out["loss"] = total / 2 if halved else total
    return out
