"""Several processes: the accelerate `Accelerator` (precision, DDP options) and the FSDP option for the LLM.

Launch with one process (`speechllm train ...`) or several (`accelerate launch --num_processes N speechllm
...`, `torchrun --nproc_per_node
N`). Without CUDA the processes use gloo on the CPU (`Accelerator(cpu=True)`),
which is how the tests run DDP and FSDP.

- DDP (default): `find_unused_parameters` as the reference (`unused_parameters: true`): frozen parts and
  branches that a batch does not reach would otherwise stop the gradient reduction. Buffers are not
  re-broadcast every step: the models hold no running statistics.
- FSDP (`fsdp: true`, several processes): torch's FSDP2 (`fully_shard`) on a 1-D mesh over all processes.
  Each decoder block of the frozen LLM (its `_no_split_modules` classes) is one unit; the root unit holds the
  rest (the trainable speech side, the frozen speech encoder / CTC head, the LLM's embeddings, which
  `SpeechLLM` also calls outside the LLM's forward). Frozen and trainable parameters may share a unit; only
  trainable ones get gradients, so the optimizer holds (sharded) state for those alone. Checkpoints hold the
  trainable weights and optimizer state gathered whole (by parameter name); a resume shards them again. With
  one process there is nothing to shard and the loop trains unsharded. Tested on the CPU with 2 gloo
  processes (tests/test_ddp.py); the same code on GPUs (NCCL) is not exercised by the test suite.

  The model is sharded here, not by `accelerator.prepare`: accelerate 1.15 refuses FSDP on the CPU. Its
  `AcceleratorState` turns an `fsdp_plugin` into `DistributedType.FSDP` only for accelerator device types
  (`accelerate/state.py`, the `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]` branch around
  line 986 that excludes `MULTI_CPU`), so with `cpu=True` the plugin is silently dropped and `prepare` wraps
  the model in DDP; and a plugin with `sync_module_states=True` raises "There are currently no available
  devices found" when built without a GPU (`accelerate/utils/dataclasses.py`, line 2014). torch's
  `fully_shard` runs with gloo on CPU meshes and with NCCL on GPUs alike, so one code path serves both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

PRECISIONS = {"fp32": "no", "tf32": "no", "bf16": "bf16"}


def set_matmul_precision(precision: str) -> None:
    """TF32 matmuls on GPU (`torch.set_float32_matmul_precision('high')`), what the BLOOMZMMS overlay's
    trainer does with `use_fast_matmul: true`; its default, which the recipe keeps, is fp32
    (DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/espnet2/tasks/abs_task.py)."""
    if precision == "tf32" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def make_accelerator(precision: str, find_unused_parameters: bool) -> Accelerator:
    """An Accelerator on CUDA when present, else CPU (gloo when launched with several processes)."""
    set_matmul_precision(precision)
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=find_unused_parameters, broadcast_buffers=False
    )
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=PRECISIONS[precision], kwargs_handlers=[ddp]
    )


# ---------------------------------------------------------------------------------------------------- FSDP


def llm_decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of the LLM(s) inside `model`: instances of their `_no_split_modules` classes."""
    from speechllm.models.speech_llm import SpeechLLM

    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, SpeechLLM):
            names = set(getattr(module.lm, "_no_split_modules", None) or [])
            blocks += [m for m in module.lm.modules() if type(m).__name__ in names]
    return blocks


def broadcast_trainable(module: nn.Module) -> None:
    """Rank 0's trainable parameters on every rank (as DDP does); frozen ones come from the same files."""
    import torch.distributed as dist

    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


def shard_module(module: nn.Module, blocks: list[nn.Module], device: torch.device) -> nn.Module:
    """FSDP2 in place: each of `blocks` one unit, `module` the root unit; full shard over all processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not blocks:
        raise ValueError("fsdp: true needs a model with an LLM whose decoder block classes are known")
    broadcast_trainable(module)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(module, mesh=mesh)


@contextlib.contextmanager
def without_gradient_sync(module: nn.Module) -> Iterator[None]:
    """FSDP2's `no_sync`: accumulate unsharded gradients locally; the next synced backward reduces them."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a DTensor (gathered: a collective) or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_trainable_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters of a sharded module, gathered whole on every rank (a collective), on CPU."""
    with torch.no_grad():
        return {
            name: local_value(param.detach()).cpu().contiguous()
            for name, param in module.named_parameters()
            if param.requires_grad
        }


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a sharded module, unsharded and keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    module.reshard()  # the mapping to names needs the sharded parameters registered
    state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))
    return {
        "state": {name: _to_cpu(values) for name, values in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def load_full_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Inverse of `full_optimizer_state`: every rank keeps its shard of the saved state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    module.reshard()
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _to_cpu(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
