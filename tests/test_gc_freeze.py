"""freeze_startup_objects: garbage alive before it is collected, not frozen; what is alive is
frozen; later garbage is still collected. Run in a child: freezing the test process would keep
its garbage."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc, weakref
from mixserve.gc_freeze import freeze_startup_objects

class Node:
    pass

def cycle():
    node = Node()
    node.self = node
    return weakref.ref(node)

gc.disable()  # only the explicit collections below
before = cycle()
kept = Node()
frozen = freeze_startup_objects()
assert before() is None, "garbage from before the freeze was frozen"
assert frozen == gc.get_freeze_count() > 0
assert not any(o is kept for g in range(3) for o in gc.get_objects(generation=g)), "not frozen"
after = cycle()
gc.collect()
assert after() is None, "garbage made after the freeze was not collected"
print(frozen)
"""


def test_freezing_keeps_no_garbage_and_later_garbage_is_collected():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 1000


def test_frozen_while_running_freezes_for_the_block_only():
    import gc

    from mixserve.gc_freeze import frozen_while_running

    assert gc.get_freeze_count() == 0, "the test process must not be frozen"
    kept = [object()]  # a tracked container alive at entry
    with frozen_while_running() as froze:
        assert froze
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for g in range(3) for o in gc.get_objects(generation=g))
    assert gc.get_freeze_count() == 0
    assert any(o is kept for o in gc.get_objects(generation=2)), "not handed back"


def test_frozen_while_running_leaves_an_outer_freeze_alone():
    import gc

    from mixserve.gc_freeze import frozen_while_running

    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with frozen_while_running() as froze:
            assert not froze
        assert gc.get_freeze_count() == count, "an outer freeze was undone"
    finally:
        gc.unfreeze()
