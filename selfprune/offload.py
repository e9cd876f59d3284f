"""Working on models that accelerate spread over devices, CPU and disk (``device_map="auto"``).

With offloading, a module's weights sit on the ``meta`` device and accelerate's hook on that module loads
them for each forward call, then drops them again. Calibration, scoring and building read or run one decoder
layer at a time, many times over: ``onloaded`` brings a layer in once for all of that work and stops the
hooks from loading it again on every forward call, and ``execution_device`` says where a module computes
when its parameters say ``meta``. A model without hooks passes through both unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks attached to ``module`` (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _offload_hook(module: nn.Module, *, loaded_too: bool = False):
    """The hook that keeps ``module``'s own weights offloaded (None if they are resident); with
    ``loaded_too``, also the hook of weights that ``onloaded`` holds loaded right now."""
    for hook in _hooks(module):
        if hasattr(hook, "weights_map") and (getattr(hook, "offload", False)
                                             or (loaded_too and getattr(hook, _LOADED_MARK, False))):
            return hook
    return None


_LOADED_MARK = "_selfprune_onloaded"   # set on a hook while ``onloaded`` holds its weights


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate placed the model (``device_map``): some module carries a device hook."""
    return getattr(model, "hf_device_map", None) is not None or any(_hooks(m) for m in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device, else the device of its first real tensor."""
    for candidate in module.modules():
        for hook in _hooks(candidate):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device)
        for tensor in list(candidate.parameters(recurse=False)) + list(candidate.buffers(recurse=False)):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embedding's execution device (a dispatched model's first parameter may
    be on ``meta``)."""
    return execution_device(model.get_input_embeddings())


@contextmanager
def onloaded(module: nn.Module, device: torch.device | str | None = None, recurse: bool = True):
    """Offloaded weights under ``module`` loaded once, onto ``device`` (default: each hook's execution
    device), for the whole ``with`` block; forward calls inside it use them without loading them again.

    accelerate's ``align_module_device`` loads a module's weights, but a forward call inside it still loads
    them again and then drops them: a layer run on eight batches would be read from disk eight times.
    Nested use is free (already loaded modules are not offloaded any more)."""
    modules = module.modules() if recurse else [module]
    loaded = []
    try:
        for sub in modules:
            hook = _offload_hook(sub)
            if hook is None:
                continue
            original_device = hook.execution_device
            if device is not None:
                hook.execution_device = torch.device(device)
            loaded.append((sub, hook, original_device))
            hook.pre_forward(sub)
            hook.offload = False     # forward calls now leave the loaded weights where they are
            setattr(hook, _LOADED_MARK, True)
        yield module
    finally:
        for sub, hook, original_device in reversed(loaded):
            hook.offload = True
            setattr(hook, _LOADED_MARK, False)
            hook.post_forward(sub, None)   # back to meta: the memory is free again
            hook.execution_device = original_device


#: Instance attributes accelerate adds to a dispatched module (besides per-instance overrides of nn.Module
#: methods such as ``forward``, ``to`` and ``cuda``); a standalone copy must not inherit them.
_DISPATCH_ATTRIBUTES = ("_hf_hook", "_old_forward", "hf_device_map")


def strip_dispatch(clone: nn.Module) -> nn.Module:
    """Remove accelerate's hook and method overrides from a (shallow) clone, so it runs its own forward.

    A clone made with ``copy.copy`` carries the original's hooked ``forward``, which is bound to the
    original module: the clone would silently compute with the original's (dense) children."""
    for name in list(clone.__dict__):
        value = clone.__dict__[name]
        if name in _DISPATCH_ATTRIBUTES or (callable(value) and not isinstance(value, nn.Module)
                                            and hasattr(nn.Module, name)):
            del clone.__dict__[name]
    return clone


def standalone_copy(module: nn.Module, device: torch.device | str, memo: dict | None = None) -> nn.Module:
    """A hook-free copy of ``module`` whose every tensor is real and on ``device``, loaded one module at a
    time: weights that were offloaded are copied; resident ones are moved (shared if already on ``device``).

    ``memo`` maps ``id`` of already copied modules and tensors to ``(original, copy)`` (holding the original
    keeps its id from being reused), so tied weights stay tied and a shared submodule is copied once; pass one
    dict to every call that builds the same model."""
    import copy

    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)][1]
    device = torch.device(device)
    clone = strip_dispatch(copy.copy(module))
    memo[id(module)] = (module, clone)
    clone._modules = {name: None if child is None else standalone_copy(child, device, memo)
                      for name, child in module._modules.items()}
    offloaded = _offload_hook(module, loaded_too=True) is not None
    originals = {"_parameters": dict(module._parameters), "_buffers": dict(module._buffers)}
    with onloaded(module, device, recurse=False):
        for table, entries in originals.items():
            copies = {}
            for name, original in entries.items():
                if original is None:
                    copies[name] = None
                    continue
                if id(original) not in memo:
                    current = getattr(module, table)[name]   # loaded now if it was offloaded
                    tensor = current.detach().to(device)
                    if offloaded and tensor.data_ptr() == current.data_ptr():
                        tensor = tensor.clone()          # never alias accelerate's offload store
                    if isinstance(original, nn.Parameter):
                        tensor = nn.Parameter(tensor, requires_grad=original.requires_grad)
                    memo[id(original)] = (original, tensor)
                copies[name] = memo[id(original)][1]
            setattr(clone, table, copies)
    return clone
