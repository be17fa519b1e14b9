"""What a compiled executable needs of its device's memory (``memory_analysis()``), and what the
device has: one home for the trainer's memory check and the TPU preflight."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class Memory:
    """``memory_analysis()`` of an executable, bytes per device (an SPMD executable is the program
    of one device)."""
    arguments: int
    outputs: int
    aliased: int  # outputs that reuse donated argument buffers
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def memory(compiled) -> Memory:
    m = compiled.memory_analysis()
    return Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                  int(m.generated_code_size_in_bytes))


def device_limit(device) -> Optional[int]:
    """Bytes the runtime lets a program use on ``device`` (TPU, GPU), or None where the device
    does not say (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None
