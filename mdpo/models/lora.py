"""LoRA on Megatron-Core's tensor-parallel linear layers (PEFT's math: y = W x + (alpha / r) B A dropout(x)).

The adapted layers are spec entries (`with_adapters` puts them in a layer spec, so the model is built with them); a
build hook (`init_adapters`) then draws A as PEFT does, for every layout alike, and freezes the base. A target
layer keeps its class's behaviour and parameters and gains `lora_A` [r, in] and `lora_B` [out, r], split
over TP the way the layer is: a column-parallel layer (fused q/k/v, MLA's up projections, fused gate/up) holds A
whole and its rows of B;
a row-parallel one (attention output, MLP output) holds its input columns of A, whose partial product is summed over
TP (reduce-scattered under sequence parallelism), and B whole; a replicated one (MLA's down projections) holds both
whole, its adapted output passing the layer's own TP handling (`models.mla`). A replicated adapter tensor that sees
only this rank's part of the sequence (sequence parallelism) is marked `sequence_parallel`, so
`finalize_model_grads` sums its gradient over TP, as for the norms. Base weights are frozen: Megatron's DDP and
optimizer hold the adapters only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from mdpo.config import LORA_TARGETS, LoRAConfig
from mdpo.errors import ConfigError
from mdpo.models.mla import LatentDownProjection

# lora.targets -> the layers' module paths inside a transformer layer, those its spec has (the one table; HF names come
# from the family's mapping table through these paths): qkv is the fused projection, or multi-latent attention's
# query and key / value projections (`models.mla`: the replicated down projections and the column-parallel others)
TARGET_MODULES = {
    "qkv": (
        "self_attention.linear_qkv",
        "self_attention.linear_q_proj",
        "self_attention.linear_q_down_proj",
        "self_attention.linear_q_up_proj",
        "self_attention.linear_kv_down_proj",
        "self_attention.linear_kv_up_proj",
    ),
    "proj": ("self_attention.linear_proj",),
    "fc1": ("mlp.linear_fc1",),
    "fc2": ("mlp.linear_fc2",),
}
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


@dataclass(frozen=True)
class Adapter:
    """What a target layer's spec entry gives its adapters: the target (lora.targets' name) and PEFT's settings."""

    target: str
    rank: int
    scaling: float
    dropout: float


def _parameter(data: torch.Tensor, *, split_dim: int | None = None, stride: int = 1, sequence_parallel: bool = False):
    param = torch.nn.Parameter(data.contiguous())
    if split_dim is not None:
        set_tensor_model_parallel_attributes(param, True, split_dim, stride)
    elif sequence_parallel:  # replicated over TP but fed this rank's part of the sequence: gradients summed over TP
        param.sequence_parallel = True
    return param


class _Adapted:
    """What the column- and row-parallel LoRA layers share: the adapters' target, scaling, dropout and on/off
    switch. A starts at zero until `init_adapters` draws it (its values need the layer's number); B is zero, so
    the model's output is the base's."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    lora_target: str
    lora_scaling: float
    lora_dropout: float
    lora_on: bool

    def _attach(self, adapter: Adapter, a: torch.nn.Parameter, b: torch.nn.Parameter) -> None:
        self.lora_A, self.lora_B = a, b
        self.lora_target, self.lora_scaling, self.lora_dropout = adapter.target, adapter.scaling, adapter.dropout
        self.lora_on = True

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x


class LoRAColumnParallelLinear(_Adapted, ColumnParallelLinear):
    """Column-parallel: A whole, B's rows of this rank. The low-rank activation is gathered over the sequence under
    sequence parallelism (its gradient reduce-scattered), else copied into the TP region (its gradient all-reduced:
    each rank's B rows contribute a part)."""

    def __init__(self, *args: object, adapter: Adapter, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        out_local, in_features = self.weight.shape
        self.lora_gated = adapter.target == "fc1"  # B's rows are [gate; up], checkpointed as two TP-sharded halves
        a = _parameter(self.weight.new_zeros(adapter.rank, in_features), sequence_parallel=bool(self.sequence_parallel))
        stride = 2 if self.lora_gated else 1  # fc1's rows are [gate; up], each split over TP
        b = _parameter(self.weight.new_zeros(out_local, adapter.rank), split_dim=0, stride=stride)
        self._attach(adapter, a, b)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight, runtime_gather_output)
        if not self.lora_on:
            return output, bias
        low = F.linear(self._lora_input(input_), self.lora_A)
        if self.sequence_parallel:
            low = gather_from_sequence_parallel_region(low, tensor_parallel_output_grad=True)
        else:
            low = copy_to_tensor_model_parallel_region(low)
        return output + F.linear(low, self.lora_B) * self.lora_scaling, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0, "bias": 0, "lora_B": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        if self.lora_gated:
            state[f"{prefix}lora_B"] = apply_swiglu_sharded_factory(state[f"{prefix}lora_B"], sharded_offsets)
        return state


class LoRARowParallelLinear(_Adapted, RowParallelLinear):
    """Row-parallel: A's input columns of this rank, whose partial product is summed over TP (reduce-scattered over
    the sequence under sequence parallelism), then B whole."""

    def __init__(self, *args: object, adapter: Adapter, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        out_features, in_local = self.weight.shape
        a = _parameter(self.weight.new_zeros(adapter.rank, in_local), split_dim=1)
        sp = bool(self.sequence_parallel)
        b = _parameter(self.weight.new_zeros(out_features, adapter.rank), sequence_parallel=sp)
        self._attach(adapter, a, b)

    def forward(self, input_):
        output, bias = super().forward(input_)
        if not self.lora_on:
            return output, bias
        partial = F.linear(self._lora_input(input_), self.lora_A)
        if self.sequence_parallel:
            low = reduce_scatter_to_sequence_parallel_region(partial)
        else:
            low = reduce_from_tensor_model_parallel_region(partial)
        return output + F.linear(low, self.lora_B) * self.lora_scaling, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 1, "lora_A": 1},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class LoRALatentDownProjection(_Adapted, LatentDownProjection):
    """MLA's replicated down projection: A and B whole, B A x added before the layer sums its RoPE columns'
    gradient over TP (`models.mla`); under sequence parallelism each rank adapts its own tokens, so both are
    `sequence_parallel` (gradients summed over TP), as the layer's weight."""

    def __init__(self, *args: object, adapter: Adapter, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        out_features, in_features = self.weight.shape
        sp = bool(self.config.sequence_parallel)
        a = _parameter(self.weight.new_zeros(adapter.rank, in_features), sequence_parallel=sp)
        b = _parameter(self.weight.new_zeros(out_features, adapter.rank), sequence_parallel=sp)
        self._attach(adapter, a, b)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        out = super().project(x)
        if not self.lora_on:
            return out
        return out + F.linear(F.linear(self._lora_input(x), self.lora_A), self.lora_B) * self.lora_scaling


LORA_CLASSES = {
    ColumnParallelLinear: LoRAColumnParallelLinear,
    RowParallelLinear: LoRARowParallelLinear,
    LatentDownProjection: LoRALatentDownProjection,
}


def with_adapters(spec: ModuleSpec, lora: LoRAConfig) -> ModuleSpec:
    """A transformer layer's spec with LoRA's class in place of each target linear (`lora.targets`) it has, the same
    parameters and forward plus the adapters. Megatron-Core's local linears only: Transformer Engine's fuse the
    norm into the linear."""
    for target in lora.targets:
        for module in TARGET_MODULES[target]:
            path, name = module.rsplit(".", 1)
            parent = spec
            for part in path.split("."):
                parent = getattr(parent.submodules, part)
            layer = getattr(parent.submodules, name, None)
            if layer is None:  # another attention's projection (MLA's, or the fused one)
                continue
            layer_class = layer.module if isinstance(layer, ModuleSpec) else layer
            if layer_class not in LORA_CLASSES:
                raise ConfigError(
                    f"lora.rank > 0 needs Megatron-Core's local linear layers, but {layer_class.__name__} would be "
                    "built (model.attention=auto chose Transformer Engine's layers here): set model.attention=sdpa"
                )
            adapter = Adapter(target, lora.rank, lora.scaling, lora.dropout)
            setattr(parent.submodules, name, ModuleSpec(module=LORA_CLASSES[layer_class], params={"adapter": adapter}))
    return spec


def initial_A(rank: int, in_features: int, seed: int, layer: int, target: str) -> torch.Tensor:
    """PEFT's init of A (Kaiming-uniform with a = sqrt(5), as nn.Linear), drawn whole from a generator of its own
    (seed, global layer, target): the same adapters at every TP/PP layout."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * len(LORA_TARGETS) + LORA_TARGETS.index(target))
    weight = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


def _output_needs_grad(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    """The frozen embedding's output marked as needing its gradient. Megatron's full recompute runs each layer in a
    reentrant checkpoint, whose backward only runs when an input needs a gradient: without this the first stage's
    adapters get none (measured: grad norm 0.0 at every step), as PEFT's `enable_input_require_grads` fixes for
    HF's gradient checkpointing. Later stages' inputs come from the pipeline needing gradients already."""
    return output.requires_grad_(True)


def init_adapters(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The build hook of a model built with adapters: freeze its base weights and draw each A (PEFT's init, the
    whole matrix from the seed, the global layer and the target, cut to this TP rank for a row-parallel layer; B
    stays zero, so the model's output is unchanged), before Megatron's DDP wraps it: DDP and the optimizer then hold
    the adapters only."""
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    model.requires_grad_(False)
    if getattr(model, "embedding", None) is not None:
        model.embedding.register_forward_hook(_output_needs_grad)
    for layer in model.decoder.layers:
        index = layer.layer_number - 1  # Megatron's layer numbers are global and 1-based
        for adapted in adapted_layers(layer):
            row = isinstance(adapted, RowParallelLinear)
            in_full = adapted.lora_A.shape[1] * (tp if row else 1)
            a = initial_A(adapted.lora_A.shape[0], in_full, seed, index, adapted.lora_target)
            with torch.no_grad():
                adapted.lora_A.copy_(a.chunk(tp, dim=1)[tp_rank] if row else a)
            adapted.lora_A.requires_grad_(True)
            adapted.lora_B.requires_grad_(True)
    return model


def adapted_layers(model: torch.nn.Module) -> list[_Adapted]:
    return [m for m in model.modules() if isinstance(m, _Adapted)]


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(adapted_layers(model))


@contextlib.contextmanager
def adapters_off(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """The base model's forward (the LoRA run's reference): the adapters of every chunk switched off, nothing
    copied."""
    layers = [layer for chunk in chunks for layer in adapted_layers(chunk)]
    for layer in layers:
        layer.lora_on = False
    try:
        yield
    finally:
        for layer in layers:
            layer.lora_on = True


def split_adapters(full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A full state dict (local-spec names) -> (base tensors, adapter tensors)."""
    base = {k: v for k, v in full.items() if not is_adapter(k)}
    return base, {k: v for k, v in full.items() if is_adapter(k)}


def merge_adapters(full: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The base tensors with each adapted weight replaced by W + scaling * B A (computed in float64, stored in the
    weight's dtype): the model the adapters make, with the base's names and shapes."""
    base, adapters = split_adapters(full)
    for name in {k.rsplit(".", 1)[0] for k in adapters}:
        weight = base[f"{name}.weight"]
        delta = adapters[f"{name}.lora_B"].double() @ adapters[f"{name}.lora_A"].double()
        base[f"{name}.weight"] = (weight.double() + scaling * delta).to(weight.dtype)
    return base


def checkpointed_state(model: torch.nn.Module, prefix: str = "") -> dict:
    """The model's part of a training checkpoint (sharded, each key after `prefix`): everything, or for a LoRA
    model its adapters alone (the frozen base is named in the checkpoint's meta and read from where the run
    started)."""
    state = model.sharded_state_dict(prefix=prefix)
    return {k: v for k, v in state.items() if is_adapter(k)} if has_adapters(model) else state


def load_checkpointed_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `checkpointed_state` saved: the whole model, or every adapter of a LoRA model."""
    if not has_adapters(model):
        model.load_state_dict(state)
        return
    result = model.load_state_dict(state, strict=False)
    wrong = [k for k in result.missing_keys if is_adapter(k)] + list(result.unexpected_keys)
    if wrong:
        raise KeyError(f"the checkpoint's adapters do not match the model's: '{wrong[0]}'")


def base_state(model: torch.nn.Module) -> dict:
    """The model's base weights (sharded), adapters left out: what a full checkpoint fills in a model built with
    adapters (`model.init_from` of a LoRA run)."""
    return {k: v for k, v in model.sharded_state_dict().items() if not is_adapter(k)}


def load_base_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `base_state` asked for: every base weight, the adapters left as they are."""
    result = model.load_state_dict(state, strict=False)
    wrong = [k for k in result.missing_keys if not is_adapter(k)] + list(result.unexpected_keys)
    if wrong:
        raise KeyError(f"the checkpoint's weights do not match the model's: '{wrong[0]}'")
