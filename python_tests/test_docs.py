"""What the documentation promises, checked as a newcomer finds out: help() of every method
class shows that class's own signature with its real defaults."""
import ast
import inspect

import pytest
from methods_helpers import one_thread  # noqa: F401  (fixture)

from sparsekern import methods

METHOD_CLASSES = [getattr(methods, n) for n in methods.__all__ if n not in ("PruningMethod", "schedules")]


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

