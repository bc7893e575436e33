"""The accelerate `Accelerator` for a stage: precision, DDP options and the FSDP option for the LLM.

Launch with one process (`speechllm train ...`) or several (`accelerate launch --num_processes N speechllm
...`, `torchrun --nproc_per_node N`). Without CUDA the processes use gloo on the CPU, which is how the tests
run DDP.

- DDP: `find_unused_parameters` as the reference (`unused_parameters: true`): frozen parts and branches that a
  batch does not reach would otherwise stop the gradient reduction. Buffers are not re-broadcast every step:
  the models hold no running statistics.
- FSDP (`fsdp: true`): the frozen LLM's decoder blocks (its `_no_split_modules`) become FSDP units, sharded
  across GPUs with `use_orig_params=True` so frozen and trainable parameters can share units; the trainable
  speech side sits in the root unit. Only exercised on GPU clusters (FSDP needs one CUDA device per process);
  the CPU test suite covers DDP.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

PRECISIONS = {"fp32": "no", "tf32": "no", "bf16": "bf16"}


def set_matmul_precision(precision: str) -> None:
    """TF32 matmuls on GPU as the reference trainer (`torch.set_float32_matmul_precision('high')`)."""
    if precision == "tf32" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def fsdp_plugin(llm_block_names: list[str]):
    """FSDP plugin that shards the given LLM block classes (full shard, full state dicts on rank 0)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not llm_block_names:
        raise ValueError("fsdp: true needs a model with an LLM whose decoder block classes are known")
    return FullyShardedDataParallelPlugin(
        sharding_strategy="FULL_SHARD",
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=llm_block_names,
        use_orig_params=True,
        state_dict_type="FULL_STATE_DICT",
        sync_module_states=True,
    )


def llm_block_names(model: nn.Module) -> list[str]:
    """Class names of the decoder blocks of the LLM inside `model` (empty without an LLM)."""
    names: set[str] = set()
    for module in model.modules():
        no_split = getattr(module, "_no_split_modules", None)
        if no_split and hasattr(module, "config"):
            names.update(no_split)
    return sorted(names)


def make_accelerator(
    precision: str, find_unused_parameters: bool, fsdp: bool = False, llm_blocks: list[str] | None = None
) -> Accelerator:
    """An Accelerator on CUDA when present, else CPU (gloo when launched with several processes)."""
    if fsdp and not torch.cuda.is_available():
        raise ValueError("fsdp: true needs CUDA devices (one per process); use DDP (fsdp: false) on CPU")
    set_matmul_precision(precision)
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=find_unused_parameters, broadcast_buffers=False
    )
    kwargs = {"fsdp_plugin": fsdp_plugin(llm_blocks or [])} if fsdp else {}
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=PRECISIONS[precision],
        kwargs_handlers=[ddp],
        **kwargs,
    )
