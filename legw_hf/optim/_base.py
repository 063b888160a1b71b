"""What Lamb and Lars share: gathering tensors, state and master weights, the one norm call, trust statistics.

A subclass implements ``_update(buckets)``: the algorithm itself, over buckets of tensors that share a param
group, device and dtype. Everything else (which tensors take part, their state, fp32 masters, checkpoints, the
trust-ratio table, sharding) lives here once.

The unit of a bucket is one *original* tensor, or rather the piece of it this process holds: the parameter
itself, the local shard of a DTensor (FSDP2), or a stretch of a flat buffer that DeepSpeed put in the parameter's
place (:class:`~legw_hf.distributed.FlatLayout`). Norms of pieces are partial; :meth:`reduce_squared_norms` makes
them whole with one all-reduce, and the algorithm never needs to know it ran sharded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import engines
from ..distributed import FlatLayout, NormReduction, local_tensor, shard_group
from ..distributed.layout import is_dtensor
from ..errors import SettingError
from . import _trust
from ._dispatch import Dispatch, Implementation, step_signature
from ._settings import check_flag, check_parameter

LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param: Tensor) -> torch.dtype:
    """Moments, momentum buffers and masters of fp16/bf16 parameters are fp32; others match the parameter."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


@dataclass
class Bucket:
    """Local pieces of original tensors of one param group on one device with one dtype, in param-group order.

    ``weights`` are what the update is computed from and written to: the fp32 master when there is one,
    otherwise the parameter itself. ``states`` hold views of the state of the parameter each piece lives in, and
    ``counters`` that state's step counters, once each (several pieces may share one flat parameter). ``rows``
    are the original tensors' rows in :attr:`LayerwiseOptimizer.trust_stats`; ``keys`` name each piece's
    scratch buffer.
    """

    group: dict[str, Any]
    has_masters: bool = False
    rows: list[int] = field(default_factory=list)
    keys: list[tuple[int, int]] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[int, Tensor] = field(default_factory=dict)
    shard_groups: list[Any] = field(default_factory=list)
    #: Set by an update that already wrote the fp16/bf16 parameters from their masters (the Triton kernels).
    params_written: bool = False

    def state_list(self, key: str) -> list[Tensor]:
        return [state[key] for state in self.states]


def _pieces(tensor: Tensor, starts: tuple[int, ...], lengths: tuple[int, ...]) -> list[Tensor]:
    flat = tensor.view(-1)
    return [flat.narrow(0, start, length) for start, length in zip(starts, lengths, strict=True)]


def _state_pieces(state: dict[str, Any], shape: torch.Size, starts, lengths) -> list[dict[str, Any]]:
    """The state of each piece of a flat parameter: its parameter-shaped tensors viewed at the piece, the rest
    (the step counter) shared."""
    views: list[dict[str, Any]] = [{} for _ in starts]
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape:
            for view, piece in zip(views, _pieces(value, starts, lengths), strict=True):
                view[key] = piece
        else:
            for view in views:
                view[key] = value
    return views


def load_triton_kernels() -> Any:
    """legw_hf's Triton kernels (:mod:`legw_hf.optim._triton_kernel`), or a :class:`~legw_hf.SettingError` on
    ``impl`` saying why they cannot be used."""
    try:
        from . import _triton_kernel
    except ImportError as error:
        raise SettingError(
            "impl",
            "'triton' needs the triton package: pip install 'legw_hf[gpu]'",
            "triton",
            detail=f"{type(error).__name__}: {error}",
        ) from None
    return _triton_kernel


def layerwise_optimizer_of(optimizer: Any) -> LayerwiseOptimizer | None:
    """The :class:`LayerwiseOptimizer` inside a chain of wrappers (accelerate's ``AcceleratedOptimizer``,
    DeepSpeed's ZeRO optimizers, each holding the next as ``.optimizer``), or None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, LayerwiseOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _warn_replaced_attribute(name: str) -> None:
    warnings.warn(
        f"the optimizer attribute {name!r} is deprecated and goes in the next release; read impl (the implementation "
        "that runs) or requested_impl (what was asked for)",
        DeprecationWarning,
        stacklevel=3,
    )


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base of :class:`~legw_hf.Lamb` and :class:`~legw_hf.Lars`.

    After each ``step()``, :attr:`trust_stats` holds one ``(n_params, 3)`` fp32 tensor on the parameters' device:
    per parameter the optimizer was built with (in that param-group order) ‖p‖, the norm the trust ratio divides by,
    and the trust ratio applied — of the whole tensor, also when an engine hands the optimizer pieces of it (the
    rows are then the same on every rank). Rows of parameters that had no gradient in that step are NaN. It is a
    by-product of the step (those norms are needed anyway) and reading it never waits for the device;
    :meth:`trust_summary` turns it into numbers to log.

    The multi-tensor path needs one parameter-sized scratch list per step (the update direction, whose norm must be
    known before any parameter changes). With ``keep_workspace`` it is kept between steps instead of being
    allocated afresh; the default keeps it on CPU, where a fresh allocation of that size is returned to the OS on
    free and page-faulted back in on every step, which costs more than the rest of the step. On CUDA the caching
    allocator already reuses the memory, so the default there is not to keep it. :attr:`workspace_bytes` says
    what is held.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        master_weights: bool,
        keep_workspace: bool | None,
    ) -> None:
        self.master_weights = check_flag("master_weights", master_weights)
        self.keep_workspace = None if keep_workspace is None else check_flag("keep_workspace", keep_workspace)
        # keyed by (id(param), piece start): contents never matter, so a reused id can only reuse a buffer of the
        # right shape
        self._kept_workspace: dict[tuple[int, int], Tensor] = {}
        self.trust_stats: Tensor | None = None
        self._scatter_index: tuple[tuple[int, ...], Tensor] | None = None
        # The original tensors, as the optimizer was built with them: trust_stats has one row each, in this order,
        # even when an engine later hands the optimizer flat partitions or empties its groups.
        self._originals: list[tuple[Tensor, dict[str, Any], str]] = []
        self._row_of: dict[int, int] = {}
        self._group_rows: dict[int, list[int]] = {}
        #: Flat buffers an engine put in place of the original tensors (id of the buffer -> its layout).
        self.layouts: dict[int, FlatLayout] = {}
        self._reduction: NormReduction | None = None
        self._reductions: dict[tuple, NormReduction] = {}
        self._stepped = False
        self._global_grad_norm: Any = None
        self._idle_rows: list[int] = []
        #: Which implementation runs the step (:mod:`legw_hf.optim._dispatch`); set by the subclass once its
        #: parameters are known.
        self._dispatch: Dispatch | None = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------------- groups
    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalise in place) a group's hyperparameters; subclasses extend this."""
        if "layer_adaptation" in group and group["layer_adaptation"] is not None:
            check_flag("layer_adaptation", group["layer_adaptation"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in group["params"]:
            check_parameter(param)
            shard_group(param)  # refuses DTensor placements whose norms are not sums of local pieces
        self._check_group(group)
        index = len(self.param_groups) - 1
        names = group.get("param_names") or [f"group{index}.{i}" for i in range(len(group["params"]))]
        rows = self._group_rows.setdefault(id(group), [])
        for param, name in zip(group["params"], names, strict=True):
            self._row_of[id(param)] = len(self._originals)
            rows.append(len(self._originals))
            self._originals.append((param, group, name))

    def use_layouts(self, layouts: dict[int, FlatLayout]) -> None:
        """Register the flat buffers an engine (DeepSpeed) puts in this optimizer's groups in place of the
        original tensors; every tensor they span must be one this optimizer was built with."""
        for layout in layouts.values():
            strangers = [tuple(t.shape) for t in layout.tensors if id(t) not in self._row_of]
            if strangers:
                raise SettingError(
                    "params",
                    f"of the {layout.engine} partitions must be tensors this optimizer was built with",
                    strangers[:3],
                )
        self.layouts.update(layouts)

    @staticmethod
    def is_adapted(group: dict[str, Any]) -> bool:
        """Whether a group's tensors get the trust ratio: its ``layer_adaptation`` key when set, else the
        group's ``adapt`` rule (``"all"``, or ``"decayed"``: only when its weight decay is not 0)."""
        flag = group.get("layer_adaptation")
        if flag is not None:
            return flag
        return group["adapt"] == "all" or group["weight_decay"] != 0

    # ----------------------------------------------------------------------------------------------- state
    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """Create a parameter's state on its first step (subclasses)."""
        raise NotImplementedError

    def _wants_master(self, param: Tensor) -> bool:
        return self.master_weights and param.dtype in LOW_PRECISION

    def _ensure_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """Create what a parameter's state lacks (all of it on its first step); subclasses may add to this."""
        if not state:
            self._init_state(group, param, state)
        if self._wants_master(param) and "master" not in state:
            state["master"] = param.detach().to(torch.float32, copy=True)

    def _gather(self) -> list[Bucket]:
        """Buckets of the pieces of the tensors that have a gradient, creating missing state on the way.

        Also settles how this step's partial norms are reduced, and fills in NaN rows of :attr:`trust_stats`
        for the tensors without a gradient.
        """
        buckets: dict[tuple[int, torch.device, torch.dtype], Bucket] = {}
        idle_rows: list[int] = []
        layout_norm = None
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                layout = self.layouts.get(id(param))
                if layout is None and id(param) not in self._row_of and not self._adopt_shard(group, index, param):
                    layout = self._layout_for_stranger(param)
                if param.grad is None:
                    idle_rows += self._rows_of(param, layout)
                    continue
                if param.grad.is_sparse:
                    raise SettingError(
                        "params", "must have dense gradients (sparse gradients are not supported)", param.grad.layout
                    )
                state = self.state[param]
                self._ensure_state(group, param, state)
                step = state.get("step")
                if step is not None and not (isinstance(step, Tensor) and step.device == param.device):
                    # Loaders that write the state themselves (DeepSpeed's universal checkpoint) may leave a number
                    # or a tensor on the device it was saved from.
                    state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device).reshape(())
                weight = state.get("master", param)
                key = (id(group), param.device, param.dtype)
                bucket = buckets.setdefault(key, Bucket(group, has_masters="master" in state))
                if layout is not None:
                    starts, lengths = layout.starts, layout.lengths
                    bucket.rows += [self._row_of[id(t)] for t in layout.tensors]
                    bucket.keys += [(id(param), start) for start in starts]
                    bucket.params += _pieces(param, starts, lengths)
                    bucket.weights += _pieces(weight, starts, lengths)
                    bucket.grads += _pieces(param.grad, starts, lengths)
                    bucket.states += _state_pieces(state, param.shape, starts, lengths)
                    bucket.shard_groups += [layout.group] * len(starts)
                    layout_norm = layout.global_grad_norm or layout_norm
                elif is_dtensor(param):  # FSDP2: the local shard, its norms summed over the shard group
                    bucket.rows.append(self._row_of[id(param)])
                    bucket.keys.append((id(param), 0))
                    bucket.params.append(local_tensor(param))
                    bucket.weights.append(local_tensor(weight))
                    bucket.grads.append(local_tensor(param.grad))
                    bucket.states.append({k: local_tensor(v) if isinstance(v, Tensor) else v for k, v in state.items()})
                    bucket.shard_groups.append(shard_group(param))
                else:
                    bucket.rows.append(self._row_of[id(param)])
                    bucket.keys.append((id(param), 0))
                    bucket.params.append(param)
                    bucket.weights.append(weight)
                    bucket.grads.append(param.grad)
                    bucket.states.append(state)
                    bucket.shard_groups.append(None)
                if "step" in state:
                    bucket.counters[id(state["step"])] = local_tensor(state["step"])
        # Same-device buckets next to each other, so the norms of a device come from one call.
        ordered = sorted(buckets.values(), key=lambda bucket: str(bucket.weights[0].device))
        groups = [g for bucket in ordered for g in bucket.shard_groups]
        self._reduction = self._reduction_for(groups, ordered[0].weights[0].device)
        self._global_grad_norm = layout_norm
        self._idle_rows = idle_rows
        return ordered

    def _reduction_for(self, groups: list[Any], device: torch.device) -> NormReduction | None:
        """The reduction of a step whose tensors live in ``groups`` (None: nothing is sharded); kept while the
        same tensors come back, so a step builds no device tensor from host data."""
        if all(g is None for g in groups):
            return None
        key = (tuple(id(g) for g in groups), device)
        if self._reductions.get(key) is None:
            self._reductions[key] = NormReduction(groups, device)
        return self._reductions[key]

    def _rows_of(self, param: Tensor, layout: FlatLayout | None) -> list[int]:
        if layout is None:
            return [self._row_of[id(param)]]
        return [self._row_of[id(t)] for t in layout.tensors]

    def _adopt_shard(self, group: dict[str, Any], index: int, param: Tensor) -> bool:
        """accelerate's FSDP2 ``prepare`` swaps each parameter of an optimizer built on the plain model for its
        DTensor, in place in the same group: take it as the original at that position when the shapes agree."""
        rows = self._group_rows.get(id(group), [])
        if not is_dtensor(param) or len(rows) != len(group["params"]):
            return False
        original, _, name = self._originals[rows[index]]
        if tuple(original.shape) != tuple(param.shape):
            return False
        shard_group(param)
        self._row_of[id(param)] = rows[index]
        self._originals[rows[index]] = (param, group, name)
        return True

    def _layout_for_stranger(self, param: Tensor) -> FlatLayout:
        """A tensor this optimizer was not built with sits in a group: an engine swapped its parameters (DeepSpeed
        does so without ``add_param_group``). Ask the engine how its buffers map to the original tensors (through the
        adapters of :mod:`legw_hf.engines`), or stop before any update: a trust ratio over such a buffer would
        silently be wrong."""
        layouts = engines.layouts_from_caller(self)
        if layouts is not None:
            self.use_layouts(layouts)
        layout = self.layouts.get(id(param))
        if layout is None:
            raise SettingError(
                "params",
                f"must be the tensors {type(self).__name__} was built with or the pieces of them an engine reports; "
                f"found an unknown tensor of shape {tuple(param.shape)} in its param groups",
                tuple(param.shape),
                detail="an engine that replaces parameters by flat partitions (DeepSpeed ZeRO, its fp16/bf16 "
                "optimizers) makes every trust ratio span many layers; legw_hf knows DeepSpeed's ZeRO 1-3 and fp16 "
                "layouts, and takes FSDP2 DTensors as they are",
            )
        return layout

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like :meth:`torch.optim.Optimizer.load_state_dict`, keeping this optimizer's dtypes.

        torch casts every floating state tensor to its parameter's dtype, which would round fp32 moments of
        bf16 parameters to bf16. Here each tensor is re-placed from the saved value instead: moments and masters
        in :func:`state_dtype`, ``step`` in fp32, all on the parameter's device. A saved master is dropped when
        this optimizer keeps none for that parameter, and created from the parameter at the next step when it
        needs one the checkpoint lacks.

        torch also replaces every group by a new dict (accelerate's ``prepare`` reloads the optimizer to place its
        state, before FSDP2 swaps the parameters for their DTensors): the original tensors' rows and groups follow
        the new groups by position, so that the swapped DTensors are still recognised.
        """
        saved_state = state_dict["state"]
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        previous_groups = list(self.param_groups)
        super().load_state_dict(state_dict)
        replaced = {id(old): new for old, new in zip(previous_groups, self.param_groups, strict=True)}
        self._group_rows = {id(replaced[key]): rows for key, rows in self._group_rows.items() if key in replaced}
        self._originals = [(tensor, replaced.get(id(group), group), name) for tensor, group, name in self._originals]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            if saved_id in saved_state:
                self.state[param] = self._restore_state(param, saved_state[saved_id])

    def _restore_state(self, param: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                state[key] = value
            elif key == "master":
                if self._wants_master(param):
                    state[key] = value.to(device=param.device, dtype=torch.float32, copy=True)
            elif key == "step":
                state[key] = value.to(device=param.device, dtype=torch.float32, copy=True)
            else:
                state[key] = value.to(device=param.device, dtype=state_dtype(param), copy=True)
        return state

    # ----------------------------------------------------------------------------------------------- step
    @property
    def impl(self) -> str | None:
        """The implementation that runs the step: the one chosen for the parameters at construction, then the one
        of the last step (they differ only when the step's tensors changed, see :mod:`legw_hf.optim._dispatch`).
        None only for a settings-only probe (:func:`~legw_hf.optim.check_optimizer`) left to choose
        automatically."""
        current = None if self._dispatch is None else self._dispatch.current
        return None if current is None else current.name

    @property
    def requested_impl(self) -> str | None:
        """The ``impl`` asked for at construction; None: chosen automatically."""
        return None if self._dispatch is None else self._dispatch.requested

    @property
    def uses_foreach(self) -> bool:
        """Whether the step runs on multi-tensor ops (every implementation but ``"reference"``)."""
        return self.impl != "reference"

    # The keywords impl replaced, readable for one more release, as what they would have been set to.
    @property
    def foreach(self) -> bool | None:
        """Deprecated: read :attr:`impl`. False for ``impl="reference"``, else None (the multi-tensor default)."""
        _warn_replaced_attribute("foreach")
        return False if self.requested_impl == "reference" else None

    @property
    def fused(self) -> str | None:
        """Deprecated: read :attr:`impl`. ``"cpu"`` or ``"triton"`` when that ``impl`` was asked for, else None."""
        _warn_replaced_attribute("fused")
        return self.requested_impl if self.requested_impl in ("cpu", "triton") else None

    def dispatch_settings(self, group: dict[str, Any]) -> tuple:
        """The settings of ``group`` that decide which implementations can run it (subclasses)."""
        return ()

    def _implementation(self, buckets: list[Bucket]) -> Implementation:
        """The implementation of this step: the cached choice for its tensors' signature."""
        return self._dispatch.choose(step_signature(self, buckets))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient. Never reads a tensor back to the host."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._gather()
        if buckets and not self._stepped:
            if engines.initialising_state(self):  # an engine's state-creating call: the state now exists, nothing moves
                return loss
            self._stepped = True
        if buckets:
            param_norm, update_norm, ratio = self._update(buckets)
            for bucket in buckets:
                if bucket.has_masters and not bucket.params_written:
                    torch._foreach_copy_(bucket.params, bucket.weights)
            self._record(buckets, _trust.stats_table(param_norm, update_norm, ratio))
        return loss

    def _update(self, buckets: list[Bucket]) -> tuple[Tensor, Tensor, Tensor]:
        """Apply the algorithm; return per-tensor ‖p‖, the ratio's denominator norm and the ratio, in bucket
        order (subclasses)."""
        raise NotImplementedError

    def squared_norms(self, tensors: list[Tensor]) -> Tensor:
        """Squared norms of ``tensors`` as one vector (one call per run of same-device tensors), passed through
        :meth:`reduce_squared_norms`."""
        runs: list[list[Tensor]] = []
        for tensor in tensors:
            if runs and runs[-1][0].device == tensor.device:
                runs[-1].append(tensor)
            else:
                runs.append([tensor])
        parts = [_trust.squared_norms(run, foreach=self.uses_foreach) for run in runs]
        squares = parts[0] if len(parts) == 1 else torch.cat([part.to(parts[0].device) for part in parts])
        return self.reduce_squared_norms(squares)

    def workspace(self, bucket: Bucket) -> list[Tensor]:
        """One scratch tensor per tensor of ``bucket``, in the state dtype, contents undefined."""
        dtype = state_dtype(bucket.params[0])
        buffers = []
        for key, weight in zip(bucket.keys, bucket.weights, strict=True):
            keep = self.keep_workspace if self.keep_workspace is not None else weight.device.type == "cpu"
            buffer = self._kept_workspace.get(key) if keep else None
            wanted = (weight.shape, dtype, weight.device)
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != wanted:
                buffer = torch.empty_like(weight, dtype=dtype, memory_format=torch.contiguous_format)
                if keep:
                    self._kept_workspace[key] = buffer
            buffers.append(buffer)
        return buffers

    @property
    def workspace_bytes(self) -> int:
        """Bytes of scratch kept between steps (0 when ``keep_workspace`` is off)."""
        return sum(buffer.nbytes for buffer in self._kept_workspace.values())

    def reduce_squared_norms(self, squares: Tensor) -> Tensor:
        """Whole squared norms from this process's partial ones: one all-reduce over the shard group when the
        step's tensors are sharded (ZeRO partitions, FSDP2 shards), the identity otherwise.

        ``squares`` is one or more vectors of one entry per tensor of the step, in bucket order, concatenated.
        """
        return squares if self._reduction is None else self._reduction(squares)

    def global_grad_norm(self, buckets: list[Bucket]) -> Tensor:
        """The norm of all the model's gradients, on device: the engine's when it steps one group at a time
        (DeepSpeed ZeRO computes it over every group first), else from this step's gradients (one reduction)."""
        if self._global_grad_norm is not None:
            norm = self._global_grad_norm()
            device = buckets[0].weights[0].device
            return torch.as_tensor(norm, device=device).to(device=device, dtype=torch.float32)
        return self.squared_norms([grad for bucket in buckets for grad in bucket.grads]).sum().sqrt()

    # ----------------------------------------------------------------------------------------------- stats
    def _record(self, buckets: list[Bucket], table: Tensor) -> None:
        """Write this step's rows into :attr:`trust_stats`. An engine that steps one group at a time (DeepSpeed)
        calls ``step`` once per group: rows of the other groups keep their values from those calls."""
        positions = tuple(row for bucket in buckets for row in bucket.rows)
        count = len(self._originals)
        if positions == tuple(range(count)):
            self.trust_stats = table
            return
        if self._scatter_index is None or self._scatter_index[0] != positions:
            self._scatter_index = (positions, torch.tensor(positions, device=table.device))
        full = torch.full((count, 3), float("nan"), dtype=table.dtype, device=table.device)
        previous = self.trust_stats
        if previous is not None:
            full[: len(previous)] = previous.to(table.device)
        if self._idle_rows:
            full[self._idle_rows] = float("nan")
        self.trust_stats = full.index_copy_(0, self._scatter_index[1], table)

    def parameter_names(self) -> list[str]:
        """One name per original tensor, in :attr:`trust_stats` row order: the group's ``param_names`` when it has
        them (named parameters or :func:`~legw_hf.decay_param_groups`), else ``"group<g>.<i>"``."""
        return [name for _, _, name in self._originals]

    def trust_summary(self, per_parameter: bool = False) -> dict[str, float]:
        """The last step's trust ratios as plain floats, for logging.

        Returns ``{"trust_ratio/min", "trust_ratio/median", "trust_ratio/max"}`` over the adapted parameters
        that had a gradient (parameters that are not adapted always have ratio 1 and are left out); with
        ``per_parameter=True`` also ``"trust_ratio/<name>"``, ``"param_norm/<name>"`` and ``"update_norm/<name>"``
        for every parameter updated in that step. Empty before the first step. Copies :attr:`trust_stats` to the
        host, i.e. waits for the device: call it when logging, not every step.
        """
        if self.trust_stats is None:
            return {}
        adapted = [self.is_adapted(group) for _, group, _ in self._originals]
        return _trust.summarize(self.trust_stats, self.parameter_names(), adapted, per_parameter=per_parameter)
