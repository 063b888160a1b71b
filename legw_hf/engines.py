"""Engines that put tensors of their own in an optimizer's param groups, as adapters the optimizers consult.

An engine such as DeepSpeed replaces the parameters of the client optimizer it wraps by flat buffers of its own,
without ``add_param_group``, and may call ``step()`` once on zero gradients to make the state exist. legw_hf's
optimizers know no engine: when a tensor they were not built with turns up in their groups, and on their first
step, they ask the adapters registered here. An adapter is a module with two functions:

- ``layouts_from_caller(optimizer)``: if the engine is the one calling ``optimizer.step()`` right now, the
  :class:`~legw_hf.distributed.FlatLayout` of each of its buffers (id of the buffer → layout), else None;
- ``initialising_state(optimizer)``: whether that call is the engine's state-initialising one, which must create
  state and move nothing.

An adapter is registered by module name beside the top-level package of its engine, and imported only once that
package has been imported (no engine could have wrapped an optimizer before): the registry itself is plain Python,
so registering costs ``import legw_hf`` nothing. legw_hf registers its DeepSpeed adapter in ``legw_hf/__init__.py``
(see there why that place covers every way DeepSpeed meets an optimizer).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

#: (top-level package of the engine, module of its adapter), in registration order.
_ADAPTERS: list[tuple[str, str]] = []


def register_engine_adapter(engine: str, adapter: str) -> None:
    """Have the optimizers consult the module ``adapter`` once the package ``engine`` has been imported."""
    if (engine, adapter) not in _ADAPTERS:
        _ADAPTERS.append((engine, adapter))


def active_adapters() -> list[ModuleType]:
    """The adapters of the registered engines that have been imported, importing each on first use."""
    return [importlib.import_module(adapter) for engine, adapter in _ADAPTERS if sys.modules.get(engine) is not None]


def layouts_from_caller(optimizer: Any) -> dict[int, Any] | None:
    """The layouts of the buffers of the engine calling ``optimizer.step()`` right now, or None when no engine
    that an adapter knows is."""
    for adapter in active_adapters():
        layouts = adapter.layouts_from_caller(optimizer)
        if layouts is not None:
            return layouts
    return None


def initialising_state(optimizer: Any) -> bool:
    """Whether an engine is calling ``optimizer.step()`` only to make its state exist."""
    return any(adapter.initialising_state(optimizer) for adapter in active_adapters())
