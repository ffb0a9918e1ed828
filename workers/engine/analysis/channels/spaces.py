"""Channel spaces: the parameter slices (members) that index one set of channels, how spaces are
joined and blocked, and the channel groups they become once the walk is done."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Member:
    """``length`` entries of ``parameter`` along ``dim``, from ``offset``, index this space's channels.

    Channel ``c`` owns the ``scale`` consecutive entries from ``offset + c * scale``.
    """

    parameter: str
    dim: int
    offset: int
    length: int
    producer: bool  # the slice that creates the channels (a conv/linear output), not a consumer's input
    scale: int = 1
    kind: str = ""  # for producers: the layer type the op stands for (Conv2d, Linear, ...)


@dataclass(frozen=True)
class Norm:
    """The ``index``-th ``aten::layer_norm`` of the canonical graph normalises this space's channels.

    Channel ``c`` owns the ``scale`` consecutive entries from ``c * scale`` of its last dimension.
    """

    index: int
    scale: int = 1


@dataclass
class ChannelSpace:
    ident: int
    size: int | None = None
    unit: int = 1  # channels are removed in aligned blocks of this many (whole groups of a grouped conv)
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    parts: list[ChannelSpace] | None = None  # set for a concatenation
    parent: ChannelSpace | None = None
    norms: list[Norm] = field(default_factory=list)
    head_width: int | None = None  # attention heads: channels are removed a whole head (this many) at a time

    def root(self) -> ChannelSpace:
        space = self
        while space.parent is not None:
            space = space.parent
        return space


@dataclass(frozen=True)
class Axis:
    """Where a value's channels are: ``space``, at dimension ``dim``, ``scale`` entries per channel (None: unknown yet).

    Attention heads (``head_width`` set): the channels were split into heads, entry ``h`` of ``dim``
    is head ``h`` (channels ``h * head_width`` to ``(h + 1) * head_width``), and ``inner`` is the
    dimension that indexes the channels within a head (None once a product has summed over it, as
    in attention scores). Only whole heads are removed, so ``inner`` is never sliced.
    """

    space: ChannelSpace
    dim: int
    scale: int | None = 1
    head_width: int | None = None
    inner: int | None = None


@dataclass
class ChannelGroup:
    """Channels that must be pruned together, in aligned blocks of ``unit``."""

    name: str  # the first producing layer
    size: int
    members: list[Member]
    blocked: list[str]
    unit: int = 1
    norms: list[Norm] = field(default_factory=list)  # layer_norms whose statistics change when it shrinks
    head_width: int | None = None  # attention heads of this many channels each (``unit`` is a multiple)

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.producer]


def layer_name(parameter: str) -> str:
    """The layer a parameter belongs to: its module, or the parameter itself for a functional model's tensor."""
    return parameter.rpartition(".")[0] or parameter


class Spaces:
    """The spaces of one analysis (part of ``walk.ChannelAnalysis``): made, given members, joined,
    blocked, and read out as groups."""

    shapes: dict
    spaces: list[ChannelSpace]

    def _new(self, blocked: str | None = None, size: int | None = None) -> ChannelSpace:
        space = ChannelSpace(ident=len(self.spaces), size=size)
        if blocked:
            space.blocked.append(blocked)
        self.spaces.append(space)
        return space

    def _produce(self, layer: str, weight: str, bias: str | None, dim: int) -> ChannelSpace:
        size = int(self.shapes[weight][dim])
        space = self._new(size=size)
        space.members.append(Member(weight, dim, 0, size, producer=True, kind=layer))
        if bias is not None and bias in self.shapes:
            space.members.append(Member(bias, 0, 0, size, producer=True, kind=layer))
        return space

    def _attach(self, axis: Axis, parameter: str | None, dim: int) -> None:
        """``parameter`` indexes the channels of ``axis`` along ``dim`` (per concatenated segment for a cat)."""
        if parameter is None or parameter not in self.shapes or len(self.shapes[parameter]) <= dim:
            return
        space = axis.space.root()
        entries = int(self.shapes[parameter][dim])
        if space.parts is None:
            scale = axis.scale
            if scale is None and space.size and entries % space.size == 0:
                scale = entries // space.size  # a flatten: the consumer's width says how much it merged
            if scale is None or space.size is None or space.size * scale != entries:
                self._block(
                    space, f"{parameter} has {entries} entries for {space.size} channels (a reshape fixes the count)"
                )
                return
            space.members.append(Member(parameter, dim, 0, entries, producer=False, scale=scale))
            return
        offset = 0
        scale = axis.scale or 1
        for part in space.parts:
            part = part.root()
            if part.size is None or part.parts is not None:
                self._block(space, "a concatenated input of unknown channels")
                return
            part.members.append(Member(parameter, dim, offset, part.size * scale, producer=False, scale=scale))
            offset += part.size * scale
        if offset != entries:
            self._block(space, f"{parameter} does not match the concatenation's channels")

    def _union(self, left: ChannelSpace, right: ChannelSpace) -> ChannelSpace:
        left, right = left.root(), right.root()
        if left is right:
            return left
        if left.parts is not None or right.parts is not None:
            self._block(left, "a concatenation joined by an elementwise op")
            self._block(right, "a concatenation joined by an elementwise op")
        if left.size is not None and right.size is not None and left.size != right.size:
            self._block(left, f"joins {left.size} channels with {right.size}")
        if left.head_width and right.head_width and left.head_width != right.head_width:
            self._block(left, f"joins heads of {left.head_width} channels with heads of {right.head_width}")
        right.parent = left
        left.size = left.size if left.size is not None else right.size
        left.unit = math.lcm(left.unit, right.unit)
        left.members.extend(right.members)
        left.norms.extend(right.norms)
        left.head_width = left.head_width or right.head_width
        left.blocked.extend(r for r in right.blocked if r not in left.blocked)
        right.members, right.blocked, right.norms = [], [], []
        return left

    def _block(self, space: ChannelSpace, reason: str) -> None:
        root = space.root()
        if reason not in root.blocked:
            root.blocked.append(reason)
        for part in root.parts or []:
            self._block(part, reason)

    def groups(self) -> list[ChannelGroup]:
        found = []
        for space in self.spaces:
            if space.parent is not None or space.parts is not None or not space.members:
                continue
            producers = [m for m in space.members if m.producer]
            if not producers or space.size is None:
                continue
            blocked = list(space.blocked)
            if space.size % space.unit:
                blocked.append(f"{space.size} channels do not split into groups of {space.unit}")
            found.append(
                ChannelGroup(
                    name=layer_name(producers[0].parameter),
                    size=space.size,
                    members=space.members,
                    blocked=blocked,
                    unit=space.unit,
                    norms=space.norms,
                    head_width=space.head_width,
                )
            )
        return found
