"""The public API's docstrings: every public name has one, and their examples run."""

import doctest
import inspect

import pytest

import fastbn
from fastbn import _config, functional

PUBLIC = [(name, getattr(fastbn, name)) for name in fastbn.__all__ if callable(getattr(fastbn, name))]


@pytest.mark.parametrize("name,obj", PUBLIC)
def test_public_names_are_documented(name, obj):
    doc = inspect.getdoc(obj)
    assert doc and len(doc.strip()) > 20, f"fastbn.{name} has no docstring"


@pytest.mark.parametrize("module", [fastbn, functional, _config], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module.__name__} failed"
