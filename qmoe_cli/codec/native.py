"""The optional C++ codec (`kernels/codec.cpp` at the top of the repository), compiled on first use and cached.

`torch.utils.cpp_extension.load` builds with the system compiler against the installed torch
(the CPU build is enough) into torch's extension cache, rebuilding only when the source changes.
Without a compiler the codec falls back to the pure-Python reference, with one warning: packing
then works, slowly.
"""

from __future__ import annotations

import functools
import subprocess
import warnings
from types import ModuleType

from ..resources import shipped_dir


@functools.cache
def codec_extension() -> ModuleType | None:
    """The compiled codec module, or None (after one warning) when it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        source = shipped_dir("native") / "codec.cpp"
        return load(name="qmoe_codec", sources=[str(source)], extra_cflags=["-O3"], verbose=False)
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"qmoe: the C++ codec could not be built ({reason}); using the slow Python reference",
                      RuntimeWarning, stacklevel=2)
        return None
