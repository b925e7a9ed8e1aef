"""Data-parallel training under torchrun, with PyTorch's own engines (DDP, FSDP2).

    torchrun --standalone --nproc-per-node 2 -m kiln pretrain recipe.yaml --train.parallel fsdp

Every rank builds the same plain model (same seed); `wrap_model` applies, from outside, activation
checkpointing, then DDP or FSDP2 (`fully_shard` on each Block, then on the root). Each rank reads its own
slice of every global batch (TokenBatches rank/world_size). Only rank 0 writes logs, metrics and
checkpoints; checkpoints hold the full, unsharded model and optimizer state (gathered with
torch.distributed.checkpoint.state_dict, keyed by parameter name), so a run saved on N ranks resumes on M.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kiln.errors import KilnError
from kiln.train.scaling import env_world  # noqa: F401  (torchrun's environment; re-exported)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:  # a process group was joined (torchrun, possibly with a single process)
        return bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_backend(requested: str, device: str) -> str:
    """The process-group backend; an unavailable one is a KilnError (raised before any work)."""
    if not dist.is_available():
        raise KilnError("this PyTorch build has no torch.distributed; run a single process or install a full build")
    backend = requested if requested != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    if backend == "nccl":
        if not device.startswith("cuda"):
            raise KilnError(f"train.backend nccl needs CUDA devices but train.device is {device!r}; "
                            f"use train.backend gloo (or auto)")
        if not dist.is_nccl_available():
            raise KilnError("train.backend nccl is not available in this PyTorch build; use gloo (or auto)")
    elif backend == "gloo" and not dist.is_gloo_available():
        raise KilnError("train.backend gloo is not available in this PyTorch build; use nccl on CUDA (or auto)")
    return backend


def init_distributed(backend_name: str, device: str) -> tuple[DistInfo, str]:
    """Join the process group torchrun set up (if any). Returns (info, device), the device being this rank's
    own GPU under CUDA. Call after every cheap check of the config: a KilnError here ends each rank alike."""
    rank, world, local = env_world()
    # a plain process runs alone; under torchrun (even with one process) the chosen wrapper is applied, so
    # DDP/FSDP2 and their collectives can be checked on a single GPU before a job goes to many
    if world <= 1 and not os.environ.get("TORCHELASTIC_RUN_ID"):
        return DistInfo(), device
    backend = resolve_backend(backend_name, device)
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise KilnError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    return DistInfo(rank, world, local, backend), device


@contextlib.contextmanager
def leave_process_group_after():
    """Leave the process group (if one was joined) when the block ends. After a block that ended well, wait for
    the other ranks first: a gloo rank that tears its group down while a peer still works (rank 0 writing the
    last checkpoint) can abort in C++ ("terminate called without an active exception"). After an error, no
    wait: a peer may never come."""
    ok = False
    try:
        yield
        ok = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def main_first(info: DistInfo, fn):
    """Run fn() on rank 0 first (e.g. data preparation), then on the other ranks. A KilnError on rank 0 is
    raised on every rank (no rank is left waiting in a collective)."""
    if not info.enabled:
        return fn()
    error, result = None, None
    if info.is_main:
        try:
            result = fn()
        except KilnError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise KilnError(box[0])
    return result if info.is_main else fn()


def on_main(is_main: bool, fn):
    """fn() on rank 0 only, its result on every rank; an exception there is raised on every rank (a KilnError
    as itself), so no rank waits for a result that never comes."""
    box = [None, None]
    if is_main:
        try:
            box[0] = fn()
        except KilnError as e:
            box[1] = ("user", str(e))
        except Exception as e:  # noqa: BLE001 (re-raised below, on every rank)
            box[1] = ("bug", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        kind, message = box[1]
        raise KilnError(message) if kind == "user" else RuntimeError(f"on rank 0: {message}")
    return box[0]


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank, before wrapping (DDP does this itself; FSDP2 does not): preparation may
    draw random numbers on rank 0 only (importing a backbone), so a freshly initialised head can differ."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast(info: DistInfo, value):
    """Rank 0's value on every rank (e.g. the run folder name with its timestamp)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------- wrapping


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from kiln.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def checkpoint_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each Block's activations in the backward pass (torch.utils.checkpoint, non-reentrant).
    The Block's forward is replaced on the instance, so parameter names (and checkpoints) do not change."""
    from torch.utils.checkpoint import checkpoint

    def wrapped(self, *args, **kwargs):
        forward = type(self).forward.__get__(self)
        if not torch.is_grad_enabled():  # eval / generation: nothing to save memory on
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for block in _blocks(model):
        if getattr(block, "_kiln_checkpointed", False):
            continue
        # a method bound to the block: a copy of the model (deepcopy, e.g. the bf16 twin) binds to the copy's
        # block, never to this one's weights
        block.forward = types.MethodType(wrapped, block)
        block._kiln_checkpointed = True
    return model


def wrap_model(model: torch.nn.Module, info: DistInfo, parallel: str, device: str,
               activation_checkpointing: bool = False) -> torch.nn.Module:
    """The model the trainer runs: the plain one, or DDP(model), or the model itself sharded by FSDP2
    (fully_shard changes it in place). Build the optimizer from the returned model's parameters."""
    if activation_checkpointing:
        checkpoint_activations(model)
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (info.world_size,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # kiln's buffers are derived tables (rotary angles), equal on every rank: never re-sent in forward
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **sync)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# ----------------------------------------------------------------------------------------------- full state


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _load_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, strict=True)


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias name: kept name} for parameters shared under several names (a tied output head)."""
    from kiln.run.checkpoint import unwrap

    plain = unwrap(model)
    first: dict[int, str] = {}
    aliases = {}
    for name, p in plain.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded weights on CPU, tied duplicates dropped. A collective under FSDP (call it on every
    rank); there the other ranks get None. Without sharding it is checkpoint.model_state."""
    from kiln.run.checkpoint import model_state, unwrap

    if not is_sharded(unwrap(model)):
        return model_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(unwrap(model), options=_options())
    if not state:  # not rank 0
        return None
    for alias in _tied_aliases(model):
        state.pop(alias, None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def load_model_state(model: torch.nn.Module, path: Path) -> None:
    """Load a full checkpoint (model.safetensors) into the plain, DDP or FSDP2-sharded model."""
    from kiln.run.checkpoint import load_weights, unwrap

    plain = unwrap(model)
    if not is_sharded(plain):
        load_weights(plain, path)
        return
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    try:
        state = load_file(str(path))
    except Exception as e:
        raise KilnError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from None
    for alias, kept in _tied_aliases(plain).items():
        if alias not in state and kept in state:
            state[alias] = state[kept]
    expected = {n for n, _ in plain.named_parameters(remove_duplicate=False)} | \
               {n for n, _ in plain.named_buffers() if n in plain.state_dict()}
    unknown = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unknown or missing:
        what = f"unexpected tensor {unknown[0]!r}" if unknown else f"missing tensor {missing[0]!r}"
        raise KilnError(f"{path}: {what} (not the model built from config.yaml)")
    set_model_state_dict(plain, state, options=_load_options())


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded, on CPU: the same for 1 process, DDP and FSDP2, so
    any of them resumes any other. A collective under FSDP (call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from kiln.run.checkpoint import unwrap

    return get_optimizer_state_dict(unwrap(model), _optimizers(optimizer), options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from kiln.run.checkpoint import unwrap

    set_optimizer_state_dict(unwrap(model), _optimizers(optimizer), state,
                             options=_load_options())
