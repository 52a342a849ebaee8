# Types of the compiled kernels (fastbn/_kernels.pyx).  These functions trust their caller,
# fastbn.functional: arrays are C-contiguous float32/float64/float16/bfloat16 data with
# per-channel arrays of the compute dtype (weight, bias, running buffers; None where absent:
# float64 for float64 data, float32 otherwise) and float64 statistics.
# relu=True applies torch's ReLU in the forward's pass; a backward given the forward's `output`
# gates the gradient by that ReLU.
from typing import Any, Literal

import numpy as np

_Array = np.ndarray[Any, np.dtype[Any]]
_F64 = np.ndarray[Any, np.dtype[np.float64]]

def _force_layout(name: Literal["planar", "columns"] | None) -> None: ...
def _set_fusion(enabled: bool) -> None: ...
def describe_layout(shape: tuple[int, ...]) -> dict[str, Any]: ...
def moments(x: _Array, mean: _F64, m2: _F64, n_threads: int, mean_lo: _F64 | None = ...) -> None: ...
def normalize_given(
    x: _Array, y: _Array, weight: _Array | None, bias: _Array | None,
    mean: _F64, invstd: _F64, n_threads: int, relu: bool = ...,
) -> None: ...
def forward_train(
    x: _Array, y: _Array, weight: _Array | None, bias: _Array | None,
    running_mean: _Array | None, running_var: _Array | None, momentum: float, eps: float,
    save_mean: _F64, save_invstd: _F64, n_threads: int, relu: bool = ...,
) -> None: ...
def forward_train_with_stats(
    x: _Array, y: _Array, weight: _Array | None, bias: _Array | None,
    running_mean: _Array | None, running_var: _Array | None, momentum: float, eps: float,
    count: float, mean: _F64, mean_lo: _F64, m2: _F64, save_invstd: _F64, n_threads: int,
    relu: bool = ...,
) -> None: ...
def forward_eval(
    x: _Array, y: _Array, weight: _Array | None, bias: _Array | None,
    running_mean: _Array, running_var: _Array, eps: float,
    save_mean: _F64, save_invstd: _F64, n_threads: int, relu: bool = ...,
) -> None: ...
def eval_table(
    weight: _Array | None, bias: _Array | None, running_mean: _Array, running_var: _Array,
    eps: float, table: _Array, save_mean: _F64, save_invstd: _F64,
) -> None: ...
def apply_table(x: _Array, y: _Array, table: _Array, n_threads: int, relu: bool = ...) -> None: ...
def same_values(snapshot: _Array, arrays: tuple[_Array | None, ...]) -> bool: ...
def grad_sums(
    dy: _Array, x: _Array, center: _F64, sum_dy: _F64, sum_dy_xc: _F64, n_threads: int,
    output: _Array | None = ...,
) -> None: ...
def backward(
    dy: _Array, x: _Array, dx: _Array, weight: _Array | None, mean: _F64, invstd: _F64,
    grad_weight: _Array | None, grad_bias: _Array | None, training: bool, n_threads: int,
    output: _Array | None = ...,
) -> None: ...
def backward_from_sums(
    dy: _Array, x: _Array, dx: _Array, weight: _Array | None, mean: _F64, invstd: _F64,
    sum_dy: _F64, sum_dy_xc: _F64, count: float, n_threads: int,
    output: _Array | None = ...,
) -> None: ...
def parallel_copy(src: _Array, dst: _Array, n_threads: int) -> None: ...
def half_simd() -> bool: ...
def convert_float16(src: _Array, dst: _Array, n_threads: int) -> None: ...
def convert_bfloat16(src: _Array, dst: _Array, n_threads: int) -> None: ...
