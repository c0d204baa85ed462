"""Models whose parameters are sharded across processes: FSDP2 (``fully_shard``), FSDP (``FullyShardedDataParallel``)
and DeepSpeed ZeRO-3. What the receptive-field trace and the maps need from them, without running their hooks.

Such a model cannot simply be called: its forward hooks gather each module's parameters from every
rank (a collective the other ranks must join) and, before the first real step, lazily initialise the
framework's state. So nothing here calls the user's module. Both entry points work on a **twin**: a
copy of the module tree (each module of the user's own class, its ``__dict__`` copied, its hooks left
out, the framework's wrappers and class swaps removed) whose parameters are tensors of our own:

* :func:`structure_twin` gives them as meta tensors of the parameters' full shapes, read from what
  the model holds (a DTensor's global shape, FSDP's flat-parameter metadata, ZeRO-3's ``ds_shape``).
  The receptive-field trace runs on it: no collective, no lazy initialisation, no memory.
* :func:`gathered` (every rank enters it) gathers the full parameters through the framework's public
  API (``DTensor.full_tensor``, ``FullyShardedDataParallel.summon_full_params(rank0_only=True)``,
  ``deepspeed.zero.GatheredParameters``) and yields, on rank zero, a twin holding them, detached and
  not requiring gradients; other ranks get ``None`` and keep nothing.

Why gather onto rank zero rather than run the probes through the sharded model on every rank in
lockstep: FSDP gathers a module's parameters for backward when the gradient reaches that module's
*output*, so an input gradient started inside a sharded unit (a monitored layer inside a block, or
a second layer's backward after the first resharded the root) finds those parameters freed; and
any failure on one rank mid-forward (out of memory, a model that refuses crops) leaves the others
waiting in a collective. Here every collective has completed before the maps start; what follows
runs on rank zero alone, exactly as in a single process (bit-identical maps), and an error there
is rank zero's only. The cost: rank zero holds the model's full parameters for the pass.

Tensor parallelism (DTensor parameters placed on a mesh dimension of their own) is refused: a
parallelised module may keep per-rank settings (local head counts...) that a whole-weight twin
would contradict, and its activations are split across ranks.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Sharding", "UnsupportedShardingError", "gathered", "sharding_of", "structure_twin"]

Sharding = Literal["fsdp2", "fsdp", "deepspeed"]
"""How a model's parameters are split across ranks: FSDP2's DTensors, FSDP's flat parameters, ZeRO-3's partitions."""


class UnsupportedShardingError(ValueError):
    """The model's parameters are laid out across ranks in a way the maps cannot follow (tensor parallelism)."""


def _distributed_types() -> tuple[type | None, type | None, type | None]:
    """``(DTensor, FSDPModule, FullyShardedDataParallel)``, or ``None`` for each this build of torch lacks."""
    if not torch.distributed.is_available():
        return None, None, None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return DTensor, FSDPModule, FullyShardedDataParallel


def _is_zero3(parameter: Tensor) -> bool:
    """A ZeRO-3 parameter: DeepSpeed's own test (``is_zero_param``) is this attribute."""
    return hasattr(parameter, "ds_id")


def sharding_of(model: nn.Module) -> Sharding | None:
    """How ``model``'s parameters are sharded, read from what it holds; ``None`` when every rank holds them whole.

    FSDP2 modules (``FSDPModule``) and DTensor parameters give ``"fsdp2"``, FSDP wrappers
    (``FullyShardedDataParallel``) ``"fsdp"``, ZeRO-3 parameters (``ds_id``) ``"deepspeed"``. DDP,
    ZeRO-1/2 and single devices hold whole parameters.

    Raises:
        UnsupportedShardingError: DTensor parameters outside FSDP2, or placed by tensor parallelism.

    Without an initialised process group nothing can be sharded: that costs nothing to check.

    Example::
        >>> sharding_of(nn.Conv2d(1, 1, 3)) is None
        True
    """
    dtensor, fsdp2_module, fsdp_module = _distributed_types()
    if dtensor is None or not torch.distributed.is_initialized():  # each of them needs a process group
        return None
    fsdp2 = fsdp = zero3 = False
    dtensors = []
    for name, module in model.named_modules():  # one walk: the table calls this before every trace
        fsdp2 = fsdp2 or isinstance(module, fsdp2_module)
        fsdp = fsdp or isinstance(module, fsdp_module)
        for key, parameter in module._parameters.items():
            if isinstance(parameter, dtensor):
                dtensors.append((f"{name}.{key}" if name else key, parameter))
            elif not zero3 and parameter is not None:
                zero3 = _is_zero3(parameter)
    for name, parameter in dtensors:
        if not (fsdp2 and _fsdp_placements(parameter.placements)):
            raise UnsupportedShardingError(
                f"parameter '{name}' is a DTensor placed {tuple(parameter.placements)} on a"
                f" {parameter.device_mesh.ndim}-D device mesh{'' if fsdp2 else ' outside FSDP2'}: tensor parallelism"
                " splits layers' weights and activations across ranks, which the receptive maps cannot follow."
                " HINT: shard with FSDP2 alone (Lightning: ModelParallelStrategy(tensor_parallel_size=1)), or leave"
                " the monitor out of this run."
            )
    if fsdp2:
        return "fsdp2"
    if fsdp:
        return "fsdp"
    return "deepspeed" if zero3 else None


def _fsdp_placements(placements: tuple) -> bool:
    """FSDP2's layouts: sharded along one dimension of the last mesh axis, replicated on any before it (HSDP)."""
    from torch.distributed.tensor import Replicate, Shard

    *outer, last = placements
    return all(type(p) is Replicate for p in outer) and type(last) in (Shard, Replicate)


# --------------------------------------------------------------------------------------------
# The twin
# --------------------------------------------------------------------------------------------

_FRESH = vars(nn.Module())
_HOOK_SLOTS = {key: value for key, value in _FRESH.items() if "hook" in key}
"""Every hook registry of a module (forward, backward, state-dict...), empty: a twin runs none of them."""

TensorFor = Callable[[nn.Module, str, Tensor], Tensor]
"""``(module, parameter name, parameter) -> the twin's parameter`` (shared parameters are asked once)."""


def _inner(module: nn.Module) -> nn.Module:
    """The module an FSDP wrapper or a ``torch.compile`` wrapper runs (both only forward to it)."""
    _, _, fsdp_module = _distributed_types()
    while True:
        if fsdp_module is not None and isinstance(module, fsdp_module):
            module = module._fsdp_wrapped_module
        elif isinstance(module._modules.get("_orig_mod"), nn.Module):  # as table.named_modules
            module = module._modules["_orig_mod"]
        else:
            return module


def _user_class(cls: type) -> type:
    """The class the user wrote: FSDP2 swaps in a subclass ``FSDP<Name>(FSDPModule, Name)`` at ``fully_shard``."""
    _, fsdp2_module, _ = _distributed_types()
    if fsdp2_module is None or not issubclass(cls, fsdp2_module):
        return cls
    return next(base for base in cls.__mro__ if not issubclass(base, fsdp2_module))


def _twin(model: nn.Module, tensor_for: TensorFor, buffer_for: Callable[[Tensor], Tensor]) -> tuple[nn.Module, dict]:
    """A hook-free, wrapper-free copy of ``model``'s module tree with the parameters ``tensor_for`` gives.

    Each module is a new instance of its user class with a shallow copy of its ``__dict__`` (so its
    forward, settings and submodule names are the user's), new parameter, buffer and submodule dicts,
    empty hook registries, no compiled call, and its own ``training`` flags. Nothing of the original
    module is changed. Returns the twin and ``{id(original module): its twin}``.
    """
    twins: dict[int, nn.Module] = {}
    parameters: dict[int, Tensor] = {}

    def parameter(module: nn.Module, name: str, value: Tensor) -> Tensor:
        if id(value) not in parameters:  # tied weights stay tied
            parameters[id(value)] = tensor_for(module, name, value)
        return parameters[id(value)]

    def copy_of(module: nn.Module) -> nn.Module:
        module = _inner(module)
        if id(module) in twins:  # a module used at two places stays one module
            return twins[id(module)]
        cls = _user_class(type(module))
        twin = cls.__new__(cls)
        twins[id(module)] = twin
        state = dict(module.__dict__)
        state.update({key: copy.copy(empty) for key, empty in _HOOK_SLOTS.items()})
        if "_compiled_call_impl" in state:
            state["_compiled_call_impl"] = None  # module.compile()'s call would run the original
        state["_parameters"] = {
            name: None if value is None else parameter(module, name, value)
            for name, value in module._parameters.items()
        }
        state["_buffers"] = {name: None if b is None else buffer_for(b) for name, b in module._buffers.items()}
        state["_modules"] = {name: None if m is None else copy_of(m) for name, m in module._modules.items()}
        for key, value in state.items():  # methods bound to the original (a patched forward) bind to the twin
            if isinstance(value, types.MethodType) and value.__self__ is module:
                state[key] = types.MethodType(value.__func__, twin)
        twin.__dict__.update(state)
        return twin

    return copy_of(model), twins


def _meta(shape: tuple[int, ...] | torch.Size, like: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device="meta"), requires_grad=like.requires_grad)


def structure_twin(model: nn.Module, sharding: Sharding | None = None) -> nn.Module:
    """A copy of ``model``'s structure on the meta device, with each parameter's full shape; it shares no
    tensor, hook or state with ``model``, so tracing it runs no collective and no lazy initialisation.

    Example::
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        >>> handle = net[0].register_forward_hook(lambda *args: None)
        >>> twin = structure_twin(net)
        >>> twin[0].weight.device, tuple(twin[0].weight.shape), len(twin[0]._forward_hooks), net[0].weight.device
        (device(type='meta'), (4, 1, 3, 3), 0, device(type='cpu'))
    """
    sharding = sharding if sharding is not None else sharding_of(model)

    def shape_of(module: nn.Module, name: str, value: Tensor) -> nn.Parameter:
        shape = value.ds_shape if sharding == "deepspeed" and _is_zero3(value) else value.shape  # a DTensor's is global
        return _meta(shape, value)

    twin, twins = _twin(model, shape_of, lambda buffer: torch.empty_like(buffer, device="meta"))
    if sharding == "fsdp":
        _restore_flat_parameters(model, twins)
    return twin


def _restore_flat_parameters(model: nn.Module, twins: dict[int, nn.Module]) -> None:
    """FSDP keeps each wrapped module's parameters as one flat shard; its metadata names them and their shapes.

    (With ``use_orig_params=False`` the modules no longer hold them at all; with ``True`` they hold views of the
    local shard.) ``FlatParameter``'s ``_param_infos``, ``_shapes`` and ``_shared_param_infos`` are its documented
    attributes.
    """
    _, _, fsdp_module = _distributed_types()
    for wrapper in model.modules():
        handle = getattr(wrapper, "_handle", None) if isinstance(wrapper, fsdp_module) else None
        if handle is None:
            continue
        flat = handle.flat_param
        placed: dict[tuple[int, str], nn.Parameter] = {}
        for info, shape in zip(flat._param_infos, flat._shapes):
            value = placed[(id(info.module), info.param_name)] = _meta(shape, flat)
            twins[id(info.module)]._parameters[info.param_name] = value
        for info in flat._shared_param_infos:
            twins[id(info.module)]._parameters[info.param_name] = placed[(id(info.prim_module), info.prim_param_name)]


def _rank() -> int:
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


@contextlib.contextmanager
def gathered(model: nn.Module, sharding: Sharding | None = None) -> Iterator[nn.Module | None]:
    """Every rank gathers ``model``'s full parameters; rank zero gets a twin holding them, the others ``None``.

    A collective: every rank must enter it at the same point of its program, with the same model.
    Through each framework's public API: FSDP2's sharded parameters are DTensors and give
    ``full_tensor()`` one by one, in the same order everywhere (modules FSDP left unsharded after a
    forward without backward are first resharded with ``FSDPModule.reshard()``, so that every value comes
    from the sharded master weights); FSDP's ``summon_full_params(rank0_only=True, writeback=False)``;
    ZeRO-3's ``GatheredParameters`` module by module (ranks other than zero release each at once). The
    twin's parameters are detached from the model's and do not require gradients, so nothing computed on
    it can reach a parameter's ``.grad``; its buffers are the model's own (read in eval mode). On exit
    everything gathered is released. Works on a whole model too (no collective, a twin on every rank).

    Example::
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> with gathered(net) as whole:
        ...     torch.equal(whole[0].weight, net[0].weight), whole[0].weight.requires_grad, whole[0] is net[0]
        (True, False, False)
    """
    sharding = sharding if sharding is not None else sharding_of(model)
    zero = _rank() == 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))  # inference tensors could not be used by the maps' autograd
        full: dict[int, Tensor] = {}
        with torch.no_grad():  # gathering records no autograd history; what runs on the twin is the caller's choice
            if sharding == "fsdp2":
                full = _full_tensors(model, keep=zero)
            elif sharding == "fsdp":
                from torch.distributed.fsdp import FullyShardedDataParallel

                summon = FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True)
                stack.enter_context(summon)
            elif sharding == "deepspeed":
                _gather_zero3(model, stack, keep=zero)
        if not zero:
            yield None
            return

        def whole(module: nn.Module, name: str, value: Tensor) -> nn.Parameter:
            return nn.Parameter(full.get(id(value), value).detach(), requires_grad=False)

        twin, _ = _twin(model, whole, lambda buffer: buffer)
        yield twin


def _full_tensors(model: nn.Module, keep: bool) -> dict[int, Tensor]:
    """FSDP2: each DTensor parameter's full value (``full_tensor``: an all-gather), by ``id`` of the parameter."""
    dtensor, fsdp2_module, _ = _distributed_types()
    for module in model.modules():
        if isinstance(module, fsdp2_module):
            module.reshard()  # a no-op where already sharded; after a forward without backward the root is not
    full = {}
    for parameter in model.parameters():  # the same order on every rank
        if isinstance(parameter, dtensor):
            value = _on_mesh_device(parameter, dtensor).full_tensor()
            if keep:
                full[id(parameter)] = value
    return full


def _on_mesh_device(parameter: Tensor, dtensor: type) -> Tensor:
    """The DTensor with its local shard where its mesh communicates: FSDP2's CPU offload keeps shards on the CPU,
    and NCCL gathers GPU tensors only."""
    mesh = parameter.device_mesh
    if parameter.device.type == mesh.device_type:
        return parameter
    local = parameter.to_local().to(mesh.device_type)  # the current device of that type
    return dtensor.from_local(
        local, mesh, parameter.placements, run_check=False, shape=parameter.shape, stride=parameter.stride()
    )


def _gather_zero3(model: nn.Module, stack: contextlib.ExitStack, keep: bool) -> None:
    """ZeRO-3: gather module by module (``GatheredParameters``); rank zero keeps them until the stack closes."""
    import deepspeed

    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if _is_zero3(p)]
        if not own:
            continue
        gathering = deepspeed.zero.GatheredParameters(own, modifier_rank=None)
        if keep:
            stack.enter_context(gathering)
        else:
            with gathering:
                pass
