"""The policy's Megatron DDP wrapper, Megatron's optimizer (AdamW with clipping, optionally distributed) and its
linear warmup/decay schedule, hooked into the model config the pipeline schedule reads."""

from __future__ import annotations

import math

import megatron.core.optimizer.clip_grads as clip_grads
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mdpo.config import TrainConfig


def wrap_ddp(cfg: TrainConfig, module: torch.nn.Module, index: int = 0) -> DistributedDataParallel:
    """Megatron's DDP around one model chunk; chunks after the first are not bucketed (as Megatron-LM does: their
    gradients are reduced after the first chunk's)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return DistributedDataParallel(
        config=module.config, ddp_config=ddp_config, module=module, disable_bucketing=index > 0
    )


def build_optimizer(cfg: TrainConfig, policy: list[DistributedDataParallel], dtype: torch.dtype) -> MegatronOptimizer:
    """Megatron's optimizer over the policy's chunks, registered with the model config for the schedule's gradient
    finalisation (DP/PP reduction, division by the global pair count) and loss scaling."""
    opt = cfg.optimizer
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=0.0,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        policy,
    )
    config = policy[0].module.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = policy[0].no_sync if len(policy) == 1 else [chunk.no_sync for chunk in policy]
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: TrainConfig, optimizer: MegatronOptimizer, train_steps: int) -> OptimizerParamScheduler:
    """Linear warmup over warmup_ratio of the steps (HF's rounding), then linear decay to 0."""
    opt = cfg.optimizer
    # Megatron's scheduler needs at least one step after warmup.
    warmup = min(math.ceil(cfg.schedule.warmup_ratio * train_steps), train_steps - 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=0.0,
        lr_warmup_steps=warmup,
        lr_decay_steps=train_steps,
        lr_decay_style="linear",
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=train_steps,
        wd_incr_style="constant",
    )


@torch.no_grad()
def optimizer_step(optimizer: MegatronOptimizer, loss_is_finite: bool) -> tuple[bool, float]:
    """One pass over the gradients a step: prepared once (copied to the optimizer's main gradients, the loss
    scaler's inf check), their norm computed once (one model-parallel all-reduce), then, when the loss and the norm
    are finite, clipped by that norm and applied: Megatron's `step()` in its parts, which would prepare the
    gradients and compute the norm a second time. Returns (updated, grad norm); nothing moves when not updated."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not (loss_is_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            # the module attribute: on CPU mdpo.megatron_cpu has wrapped it
            clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=part.config.clip_grad, total_norm=grad_norm)
    return optimizer.step_with_ready_grads(), grad_norm
