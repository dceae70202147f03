"""TR-DPO (Gorbatovski et al. 2024, TRL's `sync_ref_model`): every `dpo.ref_model_sync_steps` steps the online
reference moves toward the policy, `reference = alpha * policy + (1 - alpha) * reference`, so the implicit KL
anchor follows training instead of staying at the initial weights."""

from __future__ import annotations

import torch

from mdpo.errors import MdpoError


def mix_weights(reference: torch.Tensor, policy: torch.Tensor, alpha: float) -> torch.Tensor:
    """TRL's soft update `alpha * policy + (1 - alpha) * reference`, computed in at least float32 and rounded once
    to the reference's dtype (TRL's in-place `mul_` then `add_` rounds twice in bf16; in fp32 the two agree to an
    ulp)."""
    wide = torch.promote_types(reference.dtype, torch.float32)
    return (reference.to(wide) * (1.0 - alpha) + policy.to(wide) * alpha).to(reference.dtype)


@torch.no_grad()
def sync_reference(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """Mix this rank's shard of every policy parameter into the same shard of the reference, in place. Both are
    chunks built by `build_model` for one layout, so their parameters pair by name. Parameters only, as TRL's
    `SyncRefModelCallback` does: the buffers (RoPE frequencies) never train."""
    policy_params = dict(policy.named_parameters())
    reference_params = dict(reference.named_parameters())
    if policy_params.keys() != reference_params.keys():
        missing = sorted(policy_params.keys() ^ reference_params.keys())
        raise MdpoError(f"the reference and the policy hold different parameters ({missing[:3]} ...)")
    for name, target in reference_params.items():
        target.copy_(mix_weights(target, policy_params[name], alpha))
