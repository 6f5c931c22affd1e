"""tests/mutations.py stays runnable: every planted bug's text occurs exactly once in its file and
every test meant to kill it exists. A refactor that moves the text otherwise surfaces only when
someone runs the whole mutation table (~47 minutes), which stops at the first stale entry."""

import os
import re

import pytest

from tests.mutations import MUTATIONS, ROOT


def test_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_planted_bug_applies_once_and_names_existing_tests(mutation):
    with open(os.path.join(ROOT, mutation.path)) as f:
        source = f.read()
    assert source.count(mutation.old) == 1, f"{mutation.path} holds the text {source.count(mutation.old)} times"
    assert mutation.old != mutation.new
    for target in mutation.tests:
        path, _, node = target.partition("::")
        assert os.path.isfile(os.path.join(ROOT, path)), target
        if node:
            with open(os.path.join(ROOT, path)) as f:
                name = re.sub(r"\[.*\]$", "", node)
                assert re.search(rf"^def {re.escape(name)}\(", f.read(), re.M), target
