"""What the documentation promises, checked as a newcomer finds out: help() of every method
class shows that class's own signature with its real defaults, and README's Python example
runs as printed."""
import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from methods_helpers import one_thread  # noqa: F401  (fixture)

import sparsekern
from sparsekern import methods

METHOD_CLASSES = [getattr(methods, n) for n in methods.__all__ if n not in ("PruningMethod", "schedules")]
README = Path(__file__).resolve().parent.parent / "README.md"


def documented_signature(cls) -> inspect.Signature:
    """The `Name(arg, *, arg=default, ...)` that opens the class's own docstring."""
    doc = cls.__dict__.get("__doc__")
    assert doc, f"{cls.__name__} has no docstring of its own (help() shows a base class's)"
    head = inspect.cleandoc(doc).split("\n\n")[0]
    assert head.startswith(cls.__name__ + "("), f"{cls.__name__}'s docstring does not open with its signature"
    args = head[len(cls.__name__) + 1:head.rindex(")")]
    fn = ast.parse(f"def f(self, {args}): pass").body[0]
    namespace: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), "<doc>", "exec"), namespace)
    return inspect.signature(namespace["f"])


@pytest.mark.parametrize("cls", METHOD_CLASSES, ids=lambda c: c.__name__)
def test_method_class_docstring_states_its_own_signature(cls):
    documented = documented_signature(cls)
    actual = inspect.signature(cls.__init__)
    assert [(p.name, p.kind, p.default) for p in documented.parameters.values()] == \
           [(p.name, p.kind, p.default) for p in actual.parameters.values()]


def readme_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_torchvision_example_runs():
    """The "ten lines" as printed; only `loader` (the reader's data) is supplied: two tiny batches."""
    code = readme_block("## In Python: a torchvision ResNet in ten lines")
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([1, 7])) for _ in range(2)]
    scope = {"loader": loader}
    exec(compile(code, str(README), "exec"), scope)
    method, small, stats = scope["method"], scope["small"], scope["stats"]
    assert isinstance(method, methods.DPF) and method.sparsity == 0.9
    assert abs(method.density()["global"] - 0.1) < 1e-3  # end_iteration=None: the target from the first mask
    assert not any(isinstance(m, (sparsekern.SparseConv2d, sparsekern.SparseLinear)) for m in small.modules())
    assert stats["params_after"] <= stats["params_before"] and stats["macs_after"] is not None
