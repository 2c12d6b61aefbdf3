"""The optional C++ codec (`kernels/codec.cpp` at the top of the repository), compiled on first use and cached.

`native_build.load_optional` builds it with the system compiler against the installed torch (the
CPU build is enough) into torch's extension cache, keyed by the source's hash, under a lock that
a killed build cannot leave behind. Without a compiler the codec falls back to the pure-Python
reference, with one warning: packing then works, slowly. Waiting too long for another process's
build is an error (QmoeError), not a fallback.
"""

from __future__ import annotations

import functools
from typing import Any

from ..native_build import NativeBuild, load_optional
from ..resources import shipped_dir


def codec_build() -> NativeBuild:
    return NativeBuild(name="qmoe_codec", sources=(shipped_dir("native") / "codec.cpp",), what="the C++ codec",
                       usual="10-20 s", extra_cflags=("-O3",), is_python_module=False, timeout_s=900.0)


@functools.cache
def codec_extension() -> Any | None:
    """The compiled codec's ops (`torch.ops.qmoe_codec`: encode, decode, decode_dense), or None
    (after one warning) when it cannot be built."""
    return load_optional(codec_build(), "using the slow Python reference")
