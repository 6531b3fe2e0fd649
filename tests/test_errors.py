"""User-facing errors (crystalscope/errors.py): the exit code, the missing-dependency line.

How the CLI turns them into one line is tested in tests/cli/test_common.py.
"""

from __future__ import annotations

import pytest

from crystalscope.errors import CrystalscopeError, MissingDependencyError, require


def test_require_returns_the_module_or_names_the_extra():
    assert require("json", "core").dumps([1]) == "[1]"
    with pytest.raises(MissingDependencyError, match=r"pip install 'crystalscope\[serve\]'") as caught:
        require("crystalscope_no_such_module", "serve")
    assert isinstance(caught.value, CrystalscopeError) and caught.value.exit_code == 2
    assert "\n" not in str(caught.value)
