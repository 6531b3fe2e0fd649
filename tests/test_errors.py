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


@pytest.mark.parametrize("value,low,high,low_open,ok", [
    (0.5, 0, 1, False, True), (0, 0, 1, False, True), (0, 0, 1, True, False), (float("nan"), 0, None, False, False),
    (float("inf"), 0, None, False, False), (-1, 0, None, False, False), (2, None, 1, False, False), ("x", 0, 1, False, False)])
def test_check_number_refuses_non_finite_and_out_of_range(value, low, high, low_open, ok):
    from crystalscope.errors import check_number

    if ok:
        check_number("--x", value, low, high, low_open=low_open)
        return
    with pytest.raises(CrystalscopeError, match=r"^--x "):
        check_number("--x", value, low, high, low_open=low_open)
