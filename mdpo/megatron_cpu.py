"""Make megatron-core (0.16.1 and 0.19) run on a CPU-only torch (gloo), for tests and the CPU demo.

Megatron-Core assumes CUDA in a handful of places (measured list: ../shared/notes/megatron-core-on-cpu.md).
Each patch below names the spot it covers. `apply()` installs only `_copy_at_size_one` (a megatron-core bug on every
device) and `_mla_without_te` (TE's absence told to MLA) when CUDA is available, so the rest never reaches GPU runs;
it is called once by the entry points (CLI, tests) before any model is built.
Version-specific: re-check the list when the megatron-core pin moves.
"""

from __future__ import annotations

import functools
import importlib.util
import types
from collections.abc import Callable
from typing import Any

import megatron.core.models.common.embeddings.rope_utils as rope_utils
import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary_pos_embedding
import megatron.core.models.common.embeddings.yarn_rotary_pos_embedding as yarn_rotary_pos_embedding
import megatron.core.models.common.language_module.language_module as language_module
import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
import megatron.core.optimizer.optimizer as optimizer
import megatron.core.pipeline_parallel.schedules as schedules
import megatron.core.tensor_parallel.mappings as mappings
import megatron.core.tensor_parallel.random as mcore_random
import megatron.core.transformer.moe.moe_utils as moe_utils
import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
import megatron.core.transformer.multi_latent_attention as multi_latent_attention
import megatron.core.transformer.utils as transformer_utils
import megatron.core.utils as mcore_utils
import torch
from torch.overrides import TorchFunctionMode


def _cpu_device(*_args: Any, **_kwargs: Any) -> str:
    return "cpu"


def _is_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuFactoryTorch(types.ModuleType):
    """A stand-in for the `torch` name inside one megatron module: factories given device="cuda" build on CPU.

    Covers literal `device="cuda"` in pipeline_parallel/schedules.py (total_num_tokens, lines 596/983/2138),
    optimizer/clip_grads.py (90-207), optimizer/optimizer.py (473-485, 907), transformer/utils.py (35, 40) and
    utils.py:1207 (the local multi-tensor L2 norm used for grad norms without Apex/TE), and `pin_memory=True` in
    models/common/embeddings/rope_utils.py:62 (context parallelism's RoPE slice). Everything else is the real torch
    module.
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args: Any, **kwargs: Any) -> Any:
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return attr(*args, **kwargs)

        return factory


class _NoStream:
    """The current "CUDA stream" on CPU: waits and records are no-ops (everything runs in order on one thread).

    megatron-core 0.19's param_and_grad_buffer.py:632 asks for the current stream before every gradient reduction
    (to wait on CUDA-graph replays, which never happen here). It is also the all-to-all MoE token dispatcher's
    "device-to-host" side stream (transformer/moe/token_dispatcher.py:445, 871-898: CPU tensors stay where they are)
    and the event it records there."""

    def wait_event(self, *_args: Any) -> None:
        pass

    def wait_stream(self, *_args: Any) -> None:
        pass

    def record_event(self, *_args: Any) -> _NoStream:
        return self  # an event whose synchronize() has nothing to wait for

    def synchronize(self) -> None:
        pass


class _CudaTypeNames(TorchFunctionMode):
    """While active, CPU tensors report `.type()` as `torch.cuda.*` and `.cuda()` leaves them on the CPU.

    optimizer/distrib_optimizer.py (361, 420, 582), optimizer/optimizer.py (671, 690) and clip_grads.py:167 accept
    only 'torch.cuda.FloatTensor'-style names; distrib_optimizer.py:1089 moves the optimizer state it gathers for a
    checkpoint with `.cuda()`, rope_utils.py:64 moves context parallelism's chunk index there, and
    language_module.py:244 the last pipeline stage's copy of tied embeddings before their all-reduce. Active only
    inside the wrapped functions below.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        result = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and not result.startswith("torch.cuda."):
            return "torch.cuda." + result[len("torch.") :]
        return result


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CudaTypeNames():
            return fn(*args, **kwargs)

    return wrapper


def _host_splits(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """moe_utils.maybe_move_tensor_to_cpu (used by the all-to-all dispatcher, token_dispatcher.py:876-893) converts
    the split sizes to numpy only when they come from a GPU; all_to_all_single takes no tensor of sizes."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _copy_at_size_one(reduce: Callable) -> Callable:
    """A reduction of megatron's tensor_parallel/mappings.py (`_reduce`, `_reduce_scatter_along_first_dim`) that
    returns a copy where the group has one rank: Megatron returns its input, which autograd then takes for a view of
    it. Not CPU-specific: biased experts at expert-tensor-parallel size 1 (gpt-oss) add their fc2 bias in place to
    that output (transformer/mlp.py:247, `output += output_bias * per_token_scale`; without sequence parallelism
    through `_reduce`, with it through the reduce-scatter), which autograd refuses on a view ("Output 0 of
    _ReduceFromModelParallelRegion is a view and is being modified inplace")."""

    @functools.wraps(reduce)
    def copying(input_: torch.Tensor, group: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return input_.clone() if group.size() == 1 else reduce(input_, group, *args, **kwargs)

    copying.copies_at_size_one = True
    return copying


def _mla_without_te() -> None:
    """MLA (multi_latent_attention.py:53-63) sets HAVE_TE whenever megatron's TE extension imports, which it does
    without Transformer Engine (its `te` a stand-in), and then `isinstance(self.linear_proj, TELinear)` (line 185)
    raises TypeError: TELinear is no type there."""
    multi_latent_attention.HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def _every_device() -> None:
    """The fixes every device needs: `_copy_at_size_one`, and `_mla_without_te` (a GPU without Transformer Engine
    takes MLA's local path too)."""
    for name in ("_reduce", "_reduce_scatter_along_first_dim"):
        if not getattr(getattr(mappings, name), "copies_at_size_one", False):
            setattr(mappings, name, _copy_at_size_one(getattr(mappings, name)))
    _mla_without_te()


def apply() -> None:
    """Install the patches once: `_every_device`'s on every machine, the CPU ones where there is no CUDA."""
    _every_device()
    if torch.cuda.is_available() or isinstance(schedules.torch, _CpuFactoryTorch):  # no CUDA patch, or done
        return
    # megatron (and through it torch._dynamo, which indexes torch.cuda's functions) is imported above, before this.
    # `device=torch.cuda.current_device()` in rotary_pos_embedding.py:162, tensor_parallel/mappings.py:91-181,
    # utils.py:631 (global memory buffer), p2p_communication.py:190-321, param_and_grad_buffer and DDP buffers.
    torch.cuda.current_device = _cpu_device
    # p2p_communication.py:242/398 synchronize after sends; set_device in a few init paths.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()

    # The "CUDA" RNG tracker (tensor_parallel/random.py 235-277, 422; forked by dot_product_attention.py:217
    # even at dropout 0) keeps its named states as CPU generator states instead.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    # MoE: the all-to-all dispatcher's side stream (see _NoStream); 0.16.1's moe_utils.py:1192 reads
    # `te_general_gemm`, which it defines only when Transformer Engine imports (None: torch's matmul for the router).
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()
    token_dispatcher.maybe_move_tensor_to_cpu = _host_splits
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    for module in (schedules, clip_grads, optimizer, transformer_utils, mcore_utils, rope_utils):
        module.torch = _CpuFactoryTorch()
    # Context parallelism's RoPE slice (imported by name into rotary_pos_embedding.py and, MLA's yarn, into
    # yarn_rotary_pos_embedding.py).
    cp_slice = _with_cuda_type_names(rope_utils.get_pos_emb_on_this_cp_rank)
    rope_utils.get_pos_emb_on_this_cp_rank = rotary_pos_embedding.get_pos_emb_on_this_cp_rank = cp_slice
    yarn_rotary_pos_embedding.get_pos_emb_on_this_cp_rank = cp_slice

    # Tied embeddings under PP: the last stage's copy goes `.cuda()` before the first/last-stage all-reduce.
    module_cls = language_module.LanguageModule
    module_cls.setup_embeddings_and_output_layer = _with_cuda_type_names(module_cls.setup_embeddings_and_output_layer)
    # `.type() == 'torch.cuda.FloatTensor'` checks (see _CudaTypeNames).
    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    cls = distrib_optimizer.DistributedOptimizer
    build_groups = cls.__dict__["_build_model_and_main_param_groups"].__func__
    cls._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(build_groups))
    cls.get_parameter_state_dp_zero = _with_cuda_type_names(cls.get_parameter_state_dp_zero)
    fp16_cls = optimizer.Float16OptimizerWithFloat16Params
    fp16_cls.__init__ = _with_cuda_type_names(fp16_cls.__init__)
