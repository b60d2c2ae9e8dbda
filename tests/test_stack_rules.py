"""The construction rules and derived properties of a layer stack (service/stack_rules.py).

Pure functions: the layers here are plain frozen dataclasses with the facts the rules read,
no attach and no event loop. The engine's use of them is covered by test_volume_scenarios.py
and test_volume_model.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierdisk.service.errors import ConfigError
from tierdisk.service.layer import UnmapBehavior
from tierdisk.service.stack_rules import (
    StackProperties,
    check_read_cache,
    check_same_sector_size,
    check_write_path,
    check_write_through,
    merge_unmap_behavior,
    overlaps_of,
    smallest_of,
    write_path_length,
)

ZEROES, ANY, IGNORED = UnmapBehavior.ZEROES, UnmapBehavior.ANY, UnmapBehavior.IGNORED


@dataclass(frozen=True)
class Facts:
    """A layer as the rules see it (defaults: a writable 8-sector ram-like layer)."""

    sector_count: int = 8
    smallest_size: int = -1  # -1: the sector count
    kind: str = "ram"
    read_only: bool = False
    can_read_cache: bool = True
    fua_respected: bool = True
    keeps_writes: bool = False
    lost_at_exit: bool = True
    unmap_behavior: UnmapBehavior = ZEROES
    optimal_unmap_sectors: int = 1

    def __post_init__(self) -> None:
        if self.smallest_size < 0:
            object.__setattr__(self, "smallest_size", self.sector_count)

    @property
    def read_cache_refusal(self) -> str:
        return "" if self.can_read_cache else f"a {self.kind} layer cannot"


@dataclass(frozen=True)
class Entry:
    layer: Facts = dataclasses.field(default_factory=Facts)
    read_cache: bool = False
    write_through: bool = False


def wt(layer: Facts | None = None) -> Entry:
    return Entry(layer or Facts(), write_through=True)


def plain(layer: Facts | None = None) -> Entry:
    return Entry(layer or Facts())


def refusal(call: object) -> ConfigError:
    """The ConfigError that calling ``call`` (a no-argument function) raises."""
    assert callable(call)
    with pytest.raises(ConfigError) as info:
        call()
    return info.value


# -- construction rules --------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [[False], [False, False], [True, False], [True, True, False], [True, False, False]],
)
def test_write_through_runs_from_the_top_are_accepted(flags: list[bool]) -> None:
    check_write_through("v", [Entry(write_through=f) for f in flags])


def test_a_write_through_layer_below_a_plain_one_is_refused() -> None:
    entries = [plain(), wt(), plain()]
    exc = refusal(lambda: check_write_through("v", entries))
    assert (exc.volume, exc.layer) == ("v", 1)
    assert (
        str(exc)
        == "volume 'v', layer 1: write_through layers must form an unbroken run from the top"
    )


def test_the_first_break_in_the_run_is_named() -> None:
    exc = refusal(lambda: check_write_through("v", [wt(), plain(), wt(), wt(), plain()]))
    assert exc.layer == 2


@pytest.mark.parametrize("entries", [[wt()], [wt(), wt()]])
def test_a_write_through_bottom_is_refused(entries: list[Entry]) -> None:
    exc = refusal(lambda: check_write_through("v", entries))
    assert exc.layer == len(entries) - 1
    assert exc.problem == "the bottom layer cannot be write_through: there is nothing below it"


def test_read_cache_needs_a_layer_that_writes_without_overwriting() -> None:
    check_read_cache("v", 0, Entry(Facts(can_read_cache=True), read_cache=True))
    check_read_cache("v", 0, Entry(Facts(can_read_cache=False)))  # not a cache: no rule
    exc = refusal(
        lambda: check_read_cache("v", 3, Entry(Facts(kind="raw", can_read_cache=False), True))
    )
    assert (exc.volume, exc.layer) == ("v", 3)
    assert exc.problem == (
        "read_cache needs a layer that can write without overwriting; a raw layer cannot"
    )


def test_every_layer_has_the_bottoms_sector_size() -> None:
    check_same_sector_size("v", 2, 4096, 4096)
    exc = refusal(lambda: check_same_sector_size("v", 1, 4096, 512))
    assert (exc.volume, exc.layer) == ("v", 1)
    assert exc.problem == (
        "sector size 4096 differs from the bottom layer's 512; all layers share one sector size"
    )


def test_a_read_only_top_of_a_writable_volume_is_refused() -> None:
    entries = [plain(Facts(kind="raw", read_only=True)), plain()]
    check_write_path("v", entries, read_only=True)  # a read-only volume may have one
    exc = refusal(lambda: check_write_path("v", entries, read_only=False))
    assert exc.layer == 0
    assert exc.problem == (
        "the raw layer is read-only but on the write path of a writable volume (set the "
        "volume read_only, or put a writable layer above it)"
    )


def test_read_only_layers_below_the_write_path_are_fine() -> None:
    ro = Facts(read_only=True)
    check_write_path("v", [plain(), plain(ro), plain(ro)], read_only=False)
    check_write_path("v", [wt(), plain(), plain(ro)], read_only=False)


def test_the_topmost_read_only_layer_of_the_write_path_is_named() -> None:
    ro = Facts(read_only=True)
    exc = refusal(lambda: check_write_path("v", [wt(), wt(ro), plain(ro)], read_only=False))
    assert exc.layer == 1
    exc = refusal(lambda: check_write_path("v", [wt(), wt(), plain(ro)], read_only=False))
    assert exc.layer == 2


# -- derived properties --------------------------------------------------------------------


def test_write_path_length() -> None:
    assert write_path_length([plain()]) == 1
    assert write_path_length([plain(), plain()]) == 1
    assert write_path_length([wt(), plain(), plain()]) == 2
    assert write_path_length([wt(), wt(), plain()]) == 3
    assert write_path_length([wt(), plain(), wt(), plain()]) == 2, "the run from the top"
    assert write_path_length([wt(), wt()]) == 2, "never past the bottom"


@pytest.mark.parametrize("behavior", list(UnmapBehavior))
def test_one_write_path_layer_keeps_its_own_unmap_behavior(behavior: UnmapBehavior) -> None:
    assert merge_unmap_behavior([behavior]) is behavior


def test_several_write_path_layers_zero_only_when_each_does() -> None:
    assert merge_unmap_behavior([ZEROES, ZEROES, ZEROES]) is ZEROES
    assert merge_unmap_behavior([ZEROES, ANY]) is IGNORED
    assert merge_unmap_behavior([ANY, ANY]) is IGNORED, "two ANY layers may disagree"
    assert merge_unmap_behavior([IGNORED, ZEROES]) is IGNORED


def test_overlaps_examples() -> None:
    assert overlaps_of([Facts(8)]) == (8,)
    assert overlaps_of([Facts(8), Facts(16), Facts(4)]) == (8, 8, 4)
    assert overlaps_of([Facts(16), Facts(8), Facts(32)]) == (16, 8, 8), "a smaller layer bounds"
    # a shrink recorded by the top (smallest_size) hides the layers below past it
    assert overlaps_of([Facts(16, smallest_size=4), Facts(16), Facts(16)]) == (16, 4, 4)
    # a layer's own smallest size bounds only the layers below it, not itself
    assert overlaps_of([Facts(16), Facts(16, smallest_size=2), Facts(16)]) == (16, 16, 2)


layer_sizes = st.lists(
    st.tuples(st.integers(1, 64), st.integers(0, 64)).map(
        lambda t: Facts(t[0], smallest_size=min(t))
    ),
    min_size=1,
    max_size=6,
)


@given(layer_sizes)
def test_overlaps_follow_the_definition(layers: list[Facts]) -> None:
    overlaps = overlaps_of(layers)
    assert len(overlaps) == len(layers)
    assert overlaps[0] == layers[0].sector_count
    for i in range(1, len(layers)):
        above = layers[:i]
        expected = min(
            [ly.sector_count for ly in layers[: i + 1]] + [ly.smallest_size for ly in above]
        )
        assert overlaps[i] == expected
        assert overlaps[i] <= overlaps[i - 1], "never larger than the one above"


def test_smallest_size_of_the_volume() -> None:
    assert smallest_of([Facts(16)], 1) == 16
    assert smallest_of([Facts(16, smallest_size=4)], 1) == 4
    # a write-path layer that recorded a shrink below its own size: the volume was shrunk
    assert smallest_of([Facts(16), Facts(16, smallest_size=6), Facts(16)], 2) == 6
    # the same layer off the write path says nothing of the volume
    assert smallest_of([Facts(16), Facts(16, smallest_size=6), Facts(16)], 1) == 16
    # a write-path layer merely created smaller is no shrink of the volume
    assert smallest_of([Facts(16), Facts(8), Facts(16)], 2) == 16
    # the top's size bounds it even when nothing recorded a shrink
    assert smallest_of([Facts(4), Facts(16, smallest_size=8)], 2) == 4


def test_stack_properties_of_a_write_through_stack() -> None:
    entries = [
        wt(Facts(16, fua_respected=True, optimal_unmap_sectors=8)),
        wt(Facts(32, smallest_size=12, fua_respected=True, optimal_unmap_sectors=64)),
        plain(
            Facts(
                8,
                fua_respected=False,
                keeps_writes=True,
                lost_at_exit=False,
                unmap_behavior=ANY,
                optimal_unmap_sectors=4096,
            )
        ),
    ]
    props = StackProperties.of(entries)
    assert props == StackProperties(
        write_path=3,
        fua_respected=False,  # the bottom (on the write path) does not respect it
        keeps_writes=True,  # the bottom keeps them
        lost_at_exit=False,  # (so the server's exit does not lose them)
        unmap_behavior=IGNORED,  # ZEROES, ZEROES, ANY
        optimal_unmap_sectors=4096,
        overlaps=(16, 16, 8),
        smallest=12,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        props.write_path = 1  # type: ignore[misc]


def test_stack_properties_look_only_at_the_write_path() -> None:
    entries = [
        plain(Facts(16, unmap_behavior=ANY, optimal_unmap_sectors=8)),
        plain(
            Facts(
                16,
                smallest_size=2,
                fua_respected=False,
                keeps_writes=True,
                optimal_unmap_sectors=1024,
            )
        ),
    ]
    props = StackProperties.of(entries)
    assert props.write_path == 1
    assert props.fua_respected is True
    assert props.keeps_writes is False, "writes land in ram only"
    assert props.lost_at_exit is True
    assert props.unmap_behavior is ANY
    assert props.optimal_unmap_sectors == 8
    assert props.smallest == 16
    assert props.overlaps == (16, 16), "a lower layer's own smallest size bounds none above"
