"""Loads the compiled part, `sparsekern._C`, whose import registers the C++ ops.

When it is missing (a pure-Python checkout, or a failed build) `import sparsekern` still
works: one RuntimeWarning says so, and the ops run their pure-PyTorch references
(registered under the same names by `sparsekern.ops`), which are correct but slower.
"""
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, before _C)

try:
    from . import _C  # noqa: F401  (the import registers torch.ops.sparsekern.*)

    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised by test_missing_extension_warns_once_and_falls_back
    HAS_EXTENSION = False
    EXTENSION_ERROR = exc
    warnings.warn(
        f"sparsekern: the compiled extension sparsekern._C is not available ({exc}); "
        "falling back to the pure-PyTorch reference ops, which are slower. Build it with "
        "`pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )
