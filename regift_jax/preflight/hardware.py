"""TPU generations, slice names and compile-only devices.

A slice is named either by its Cloud accelerator type (``v5litepod-16``, ``v5e-8``, ``v4-32``,
``v5p-8``, ``v6e-8``) or by its topology (``v5e:4x4``, ``v4:2x2x4``).  v4 and v5p accelerator
types count TensorCores (two per chip, one JAX device per chip in megacore mode), v5e and v6e
count chips.

:func:`topology_devices` asks libtpu for the devices of a slice without any TPU attached
(``jax.experimental.topologies``); programs lowered with shardings over them compile for that
TPU on the CPU.  libtpu takes a lock file when it initialises so that two processes do not drive
the same chips; a compile-only topology drives none, so :func:`topology_devices` sets
``ALLOW_MULTIPLE_LIBTPU_LOAD`` (unless the caller set it) and several preflights, or a preflight
beside another libtpu user, can run at once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
from typing import Dict, Tuple

from jax.experimental import topologies

GIB = 1024 ** 3


class TopologyError(ValueError):
    """A slice name that is not a known TPU topology or accelerator type."""


class LibtpuMissing(RuntimeError):
    """libtpu is not installed: no TPU compiler to compile with."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation (Cloud TPU documentation, dense bf16)."""
    generation: str
    hbm_gib: float  # HBM capacity
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes_per_s: float  # HBM bandwidth
    ici_bytes_per_s: float  # bidirectional inter-chip interconnect bandwidth, all links
    megacore: bool  # two TensorCores presented as one device

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * GIB


# v4's ICI figure is six links of 50 GB/s each way; the others are the documented per-chip
# bidirectional bandwidth.
CHIPS: Dict[str, Chip] = {
    "v4": Chip("v4", 32.0, 275e12, 1200e9, 600e9, True),
    "v5e": Chip("v5e", 16.0, 197e12, 819e9, 400e9, False),
    "v5p": Chip("v5p", 95.0, 459e12, 2765e9, 1200e9, True),
    "v6e": Chip("v6e", 32.0, 918e12, 1638e9, 800e9, False),
}

# Chip grids of the usual slice sizes (chips -> topology).
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6e": "v6e", "v5e": "v5e", "v5p": "v5p",
            "v4": "v4"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its generation's :class:`Chip`, topology name and chip count."""
    chip: Chip
    topology: str  # e.g. "v5e:4x4"
    accelerator_type: str  # e.g. "v5e-16" (Cloud naming; v4/v5p count TensorCores)

    @property
    def num_chips(self) -> int:
        return math.prod(int(x) for x in self.topology.split(":")[1].split("x"))


def parse_slice(name: str) -> Slice:
    """A :class:`Slice` from ``v5e:4x4`` / ``v4:2x2x4`` or ``v5litepod-16`` / ``v4-32`` ..."""
    name = str(name).strip().lower()
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite):(\d+(?:x\d+){1,2})", name)
    if m:
        gen = _ALIASES[m.group(1)]
        grid = m.group(2)
        chips = math.prod(int(x) for x in grid.split("x"))
        cores = chips * (2 if CHIPS[gen].megacore else 1)
        return Slice(CHIPS[gen], f"{gen}:{grid}", f"{gen}-{cores}")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite)-(\d+)", name)
    if not m:
        raise TopologyError(
            f"unknown TPU slice {name!r}: give an accelerator type (v4-32, v5litepod-16, v5e-8, "
            f"v5p-8, v6e-8) or a topology (v5e:4x4, v4:2x2x4, v6e:2x4)")
    gen, n = _ALIASES[m.group(1)], int(m.group(2))
    chip = CHIPS[gen]
    chips = n // 2 if chip.megacore else n
    grids = _GRIDS_3D if chip.megacore else _GRIDS_2D
    if chips not in grids:
        raise TopologyError(f"{name!r}: no standard {gen} topology with {chips} chips; pass the "
                            f"topology itself (e.g. {gen}:{next(iter(grids.values()))})")
    return Slice(chip, f"{gen}:{grids[chips]}", f"{gen}-{n}")


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
    if not libtpu_available():
        raise LibtpuMissing(
            "the TPU preflight compiles with libtpu, which is not installed: pip install -e "
            "'.[tpu]' (jax[tpu]) on this machine, or skip the preflight")


@functools.lru_cache(maxsize=None)
def topology_devices(topology: str) -> Tuple:
    """The compile-only JAX devices of a TPU topology (``"v5e:2x4"``), one per chip."""
    require_libtpu()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kw = {"chip_config_name": "megacore"} if CHIPS[topology.split(":")[0]].megacore else {}
    return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                              **kw).devices)
