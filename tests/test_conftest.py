"""The slow list of tests/conftest.py names tests that exist, and marks them."""

import importlib
from pathlib import Path

import pytest

from tests.conftest import COLLECTED, SLOW, is_listed, slow_key

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("key", sorted(SLOW))
def test_every_slow_entry_names_an_existing_test(key):
    path, *names = slow_key(key).split("::")
    assert path.startswith("tests/") and path.endswith(".py") and (ROOT / path).is_file(), key
    target = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    for name in names:
        assert hasattr(target, name), f"{key}: no {name} in {path}; update tests/conftest.py"
        target = getattr(target, name)
    assert callable(target) and names[-1].startswith("test"), key


def test_a_function_entry_covers_its_parameter_sets_and_a_set_entry_only_itself():
    function = next(k for k in SLOW if k == slow_key(k))
    one_set = next(k for k in SLOW if k != slow_key(k))
    assert is_listed(function) and is_listed(function + "[any-id]")
    assert is_listed(one_set) and not is_listed(slow_key(one_set) + "[another-id]")
    assert slow_key("tests/a/test_b.py::C::test_d") == "tests/a/test_b.py::C::test_d"


def test_the_slow_list_is_measured_not_empty():
    assert SLOW, "tests/conftest.py lists no slow test: `-m 'not slow'` would not be faster"
    assert all(isinstance(seconds, float) and seconds > 0 for seconds in SLOW.values())


def test_the_collected_slow_tests_carry_the_marker(request):
    collected = request.config.stash[COLLECTED]
    for item in request.session.items:
        listed = is_listed(item.nodeid)
        assert not listed or item.get_closest_marker("slow") is not None, item.nodeid
    for key in SLOW:  # a parameter set listed, its function collected: the set must be there
        if key != slow_key(key) and any(slow_key(n) == slow_key(key) for n in collected):
            assert key in collected, f"{key}: no such parameter set; update tests/conftest.py"
