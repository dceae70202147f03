"""Starting and stopping torch.distributed plus Megatron's parallel state, for training and the converters."""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

import torch
from megatron.core import parallel_state

from mdpo.config import Layout
from mdpo.lifeline import watch_launcher


class Ranks(NamedTuple):
    """This process's place in each of Megatron's groups."""

    tp: int
    pp: int
    dp: int
    cp: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(layout: Layout) -> Ranks:
    """NCCL on GPU, gloo on CPU; a process not launched by torchrun is a world of one. The layout's TP, PP and CP
    sizes make Megatron's groups (DP is what the world size leaves; EP x ETP groups are carved out of TP x CP x
    DP)."""
    watch_launcher()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
    )
    return ranks()


def ranks() -> Ranks:
    return Ranks(
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_context_parallel_rank(),
    )


def _megatron_groups() -> list[str]:
    """The names of parallel_state's globals that hold a process group."""
    return [name for name, value in vars(parallel_state).items() if isinstance(value, torch.distributed.ProcessGroup)]


def stop() -> None:
    """Every group Megatron made released, then the process group. destroy_model_parallel leaves some set
    (megatron-core 0.16.1: the two intra-partial data-parallel groups, parallel_state.py:910-911), which a process
    forked afterwards would inherit (`holds_process_group`): they are released too."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for name in _megatron_groups():
        setattr(parallel_state, name, None)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def holds_process_group() -> bool:
    """Whether this process holds a process group (a running world, or groups megatron-core left set): a process
    forked from it would inherit them, half alive (their gloo threads are not copied), and hang destroying them or
    fail on the inherited world, so it must spawn instead."""
    return torch.distributed.is_initialized() or bool(_megatron_groups())
