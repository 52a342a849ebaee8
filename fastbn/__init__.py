"""fastbn: fast, torch-faithful CPU batch normalisation for numpy arrays.

>>> import numpy as np, fastbn
>>> bn = fastbn.BatchNorm2d(64)
>>> y = bn(np.random.rand(8, 64, 32, 32).astype(np.float32))   # training mode
>>> dx = bn.backward(np.ones_like(y))                            # sets bn.grad_weight, bn.grad_bias
>>> y = bn.eval()(np.random.rand(1, 64, 32, 32).astype(np.float32))

``fastbn.show_config()`` (or ``python -m fastbn info``) tells how this build runs here: SIMD
variant, OpenMP runtime, threads.  ``fastbn.get_num_threads()`` and
``fastbn.set_num_threads(n)`` read and set the kernels' default thread count.
"""

from . import functional
from ._config import config, show_config
from ._dispatch import simd_level
from ._openmp import get_num_threads, set_num_threads
from ._version import __version__
from .checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, read_checkpoint
from .distributed import SyncBatchNorm  # mpi4py is imported only when a module needs it
from .functional import batch_stats, merge_stats
from .fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from .models import fold_batchnorms, load_batchnorms
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, IncompatibleKeys

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CheckpointError",
    "IncompatibleKeys",
    "SyncBatchNorm",
    "UnsafeCheckpointError",
    "batch_stats",
    "fold_batchnorms",
    "fuse_conv_bn_weights",
    "fuse_linear_bn_weights",
    "merge_stats",
    "config",
    "functional",
    "get_num_threads",
    "load_batchnorms",
    "load_checkpoint",
    "read_checkpoint",
    "set_num_threads",
    "show_config",
    "simd_level",
    "__version__",
]
