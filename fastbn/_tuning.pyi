# Types of fastbn/_tuning.pyx: the kernels' process-wide tuning switches (tests and tuning only).
from typing import Literal

LAYOUTS: dict[str | None, int]

def force_layout(name: Literal["planar", "columns"] | None) -> None: ...
def set_fusion(enabled: bool) -> None: ...
