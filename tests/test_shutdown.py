"""shutdown() releases every process group where DeepSpeed-like code keeps it, so gloo's threads end before exit.

One gloo process group of world 1 in this process (no launch): the references are planted the ways the
real holders keep them (an attribute as on the engine and ZeRO parameters, a list, a dict key, a closure
cell, a function default as in torch.distributed.nn.functional). The 2-rank DeepSpeed workers
(id3_ds/runtime/launching.end_worker) check the same on real engines at every launch.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch.distributed as dist

from id3_ds.integration.shutdown import shutdown
from id3_ds.processes import free_port
from id3_ds.runtime.launching import gloo_threads


class Holder:
    """Keeps a group as an attribute, like the engine (`data_parallel_group`) or a ZeRO-3 parameter."""

    def __init__(self, group) -> None:
        self.group = group


@pytest.fixture
def world_of_one():
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    gc.unfreeze()  # shutdown() froze this test process's heap: give it back to the collector
    if dist.is_initialized():
        dist.destroy_process_group()


def _named_gloo_threads(wait_s: float = 10.0) -> list[str]:
    """gloo's threads, once they have named themselves: each sets its name after it starts, so right after a
    group is made a loaded machine may still show them under the process's name (this test failed 2 runs in 6)."""
    deadline = time.monotonic() + wait_s
    while not (names := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return names


def test_shutdown_frees_every_kept_group_and_ends_gloo_threads(world_of_one) -> None:
    world = dist.group.WORLD
    sub = dist.new_group([0])
    assert _named_gloo_threads(), "gloo started no threads: this test could not tell a release from none"
    holder, kept, by_key = Holder(sub), [world, sub], {world: [0]}

    def default(group=world):  # noqa: B008  (a default that holds the group, as torch's nn.functional does)
        return group

    closure = (lambda group: lambda: group)(sub)  # a closure cell, as in hooks that capture their group
    del world, sub
    left = shutdown()
    assert left == []
    assert gloo_threads() == []  # the groups' destructors ran: their threads are joined, none is left to exit
    assert holder.group is None and kept == [None, None] and by_key == {}
    assert default() is None and closure() is None
    assert not dist.is_initialized()


def test_a_reference_the_collector_cannot_see_is_reported(world_of_one) -> None:
    hidden = {"group": dist.new_group([0])}  # only atomic values besides the group: the collector never tracks it
    gc.collect()
    assert not gc.is_tracked(hidden)
    left = shutdown()
    assert len(left) == 1 and "1 reference(s) left" in left[0] and "objects gc cannot see" in left[0]
    assert hidden["group"] is not None
    del hidden  # the last reference: its threads end here, not at this test process's exit
    assert gloo_threads() == []


def test_shutdown_without_a_process_group_does_nothing() -> None:
    assert not dist.is_initialized()
    assert shutdown() == []
