"""The shape of a multi-node launch, read from the files users launch with, and checked for agreement.

A DeepSpeed hostfile (``host slots=N`` per line) and an accelerate config (``num_machines``, ``num_processes``
counted over all machines, ``machine_rank``) each say how many nodes and processes a job has. When they, or the
``--nodes``/``--gpus-per-node`` a user types, disagree, a launcher waits for processes that never come or trains
at another global batch than planned; :func:`agreed_world` says which numbers differ instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SettingError

_HOST_LINE = re.compile(r"^(?P<host>\S+)(?:\s+slots\s*=\s*(?P<slots>\S+))?\s*$")


@dataclass(frozen=True)
class LaunchWorld:
    """Nodes and processes (GPUs) per node of one job, and where the numbers were read."""

    slots: tuple[int, ...]
    source: str

    @property
    def nodes(self) -> int:
        return len(self.slots)

    @property
    def world_size(self) -> int:
        return sum(self.slots)

    @property
    def processes_per_node(self) -> int:
        if len(set(self.slots)) != 1:
            raise SettingError(
                "processes_per_node",
                f"must be the same on every node for a data-parallel batch split ({self.source} gives "
                f"{', '.join(map(str, self.slots))})",
                self.slots,
            )
        return self.slots[0]

    def describe(self) -> str:
        return f"{self.nodes} nodes x {'/'.join(map(str, sorted(set(self.slots))))} processes ({self.source})"


def world_of(nodes: int, processes_per_node: int, source: str = "--nodes/--gpus-per-node") -> LaunchWorld:
    return LaunchWorld((processes_per_node,) * nodes, source)


def read_hostfile(path: str | Path) -> LaunchWorld:
    """A DeepSpeed hostfile: one ``hostname slots=N`` per line; ``#`` comments and blank lines are skipped."""
    text = _read(path, "hostfile")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        slots = match and match["slots"]
        if match is None or slots is None or not slots.isdigit() or int(slots) < 1:
            raise SettingError(
                "hostfile", f"line {number} must read 'hostname slots=N' with N >= 1 ({path})", raw.strip()
            )
        if match["host"] in hosts:
            raise SettingError("hostfile", f"lists host {match['host']!r} twice (line {number} of {path})", raw)
        hosts[match["host"]] = int(slots)
    if not hosts:
        raise SettingError("hostfile", f"must list at least one 'hostname slots=N' line ({path})", "")
    return LaunchWorld(tuple(hosts.values()), f"hostfile {path}")


def read_accelerate_config(path: str | Path) -> LaunchWorld:
    """An ``accelerate launch --config_file`` YAML: ``num_machines`` and ``num_processes`` (over all machines)."""
    import yaml

    try:
        config = yaml.safe_load(_read(path, "accelerate_config"))
    except yaml.YAMLError as error:
        raise SettingError("accelerate_config", f"must be YAML ({path}: {error})", str(path)) from None
    if not isinstance(config, dict):
        raise SettingError("accelerate_config", f"must be a YAML mapping ({path})", type(config).__name__)
    machines = _count(config, "num_machines", path, default=1)
    processes = _count(config, "num_processes", path, default=machines)
    if processes % machines:
        raise SettingError(
            "num_processes",
            f"in {path} counts processes over all machines and must be a multiple of num_machines ({machines})",
            processes,
        )
    rank = config.get("machine_rank", 0)
    if not isinstance(rank, int) or not 0 <= rank < machines:
        raise SettingError("machine_rank", f"in {path} must be in 0..{machines - 1} (num_machines {machines})", rank)
    if machines > 1 and not config.get("main_process_ip"):
        raise SettingError(
            "main_process_ip", f"in {path} must name the rank-0 machine when num_machines is {machines}", None
        )
    world = LaunchWorld((processes // machines,) * machines, f"accelerate config {path}")
    deepspeed = config.get("deepspeed_config") or {}
    ds_file = deepspeed.get("deepspeed_config_file")
    if config.get("distributed_type") == "DEEPSPEED" and ds_file and not Path(ds_file).is_file():
        raise SettingError(
            "deepspeed_config_file",
            f"in {path} must name an existing DeepSpeed config (relative paths start where accelerate is launched, "
            f"{Path.cwd()})",
            ds_file,
        )
    hostfile = deepspeed.get("deepspeed_hostfile")
    if hostfile:
        agreed_world([world, read_hostfile(Path(path).parent / hostfile)])
    return world


def agreed_world(worlds: list[LaunchWorld]) -> LaunchWorld:
    """The one world all sources describe; a :class:`SettingError` naming the sources that disagree."""
    first = worlds[0]
    for other in worlds[1:]:
        if other.slots != first.slots:
            field = "nodes" if other.nodes != first.nodes else "processes_per_node"
            raise SettingError(
                field,
                f"must agree between the launch files: {first.describe()} but {other.describe()}",
                (first.nodes, first.world_size, other.nodes, other.world_size),
                detail="nodes and total processes",
            )
    return first


def _count(config: dict[str, Any], key: str, path: str | Path, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(key, f"in {path} must be an integer >= 1", value)
    return value


def _read(path: str | Path, field: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as error:
        raise SettingError(field, f"must be a readable file ({error.strerror})", str(path)) from None
