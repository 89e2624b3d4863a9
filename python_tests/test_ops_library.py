"""The op registry: Python fallback schemas match the compiled ones, and a missing
extension gives one clear warning and working reference ops."""
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekern
from sparsekern.ops._library import CPP_SCHEMAS


@pytest.mark.skipif(not sparsekern.HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize("name", sorted(CPP_SCHEMAS))
def test_fallback_schema_equals_compiled(name):
    compiled = str(getattr(torch.ops.sparsekern, name).default._schema)
    assert compiled == "sparsekern::" + CPP_SCHEMAS[name]


def test_missing_extension_warns_once_and_falls_back():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["sparsekern._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparsekern
            import sparsekern.ops
        import torch
        ours = [w for w in caught if "sparsekern" in str(w.message)]
        assert len(ours) == 1 and ours[0].category is RuntimeWarning, [str(w.message) for w in ours]
        assert "reference" in str(ours[0].message)
        assert not sparsekern.HAS_EXTENSION
        t = torch.randn(101, generator=torch.Generator().manual_seed(0))
        thr = sparsekern.ops.magnitude_threshold([t], 0.5)
        assert thr == torch.kthvalue(t.abs(), 50).values
        masks = sparsekern.ops.magnitude_masks([t], 0.5)
        assert int((~masks[0]).sum()) == 50
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
