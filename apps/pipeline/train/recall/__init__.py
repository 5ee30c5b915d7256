"""Recall channels: one class per channel, all ``base.Recaller``s, plus ``fuse``. Pure core.

``RECALLERS`` maps a channel name (what bundles, experiments and responses call it) to its
class. It is built on first access because the semantic channel's module imports this
package's helpers; importing it here eagerly would make the two modules import each other.
None of this imports torch: the semantic channel loads it only when it embeds text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apps.pipeline.train.recall._common import Channel
from apps.pipeline.train.recall.content import Category, Content, PriceBand, Tag
from apps.pipeline.train.recall.ease import EASE
from apps.pipeline.train.recall.fusion import fuse
from apps.pipeline.train.recall.neighbours import ItemCF, UserCF
from apps.pipeline.train.recall.popularity import Popular, Trending
from apps.pipeline.train.recall.vector import EmbeddingChannel, Vector

if TYPE_CHECKING:
    from apps.pipeline.train.base import Recaller

__all__ = [
    "EASE",
    "RECALLERS",
    "Category",
    "Channel",
    "Content",
    "EmbeddingChannel",
    "ItemCF",
    "Popular",
    "PriceBand",
    "Tag",
    "Trending",
    "UserCF",
    "Vector",
    "fuse",
]

_REGISTRY: dict[str, type[Recaller]] = {}


def _registry() -> dict[str, type[Recaller]]:
    if not _REGISTRY:
        from apps.pipeline.train.semantic import Semantic

        channels: list[type[Channel]] = [
            ItemCF,
            UserCF,
            EASE,
            Content,
            Tag,
            Category,
            PriceBand,
            Popular,
            Trending,
            Vector,
            Semantic,
        ]
        _REGISTRY.update({cls.name: cls for cls in channels})
    return _REGISTRY


def __getattr__(name: str) -> object:
    if name == "RECALLERS":
        return _registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
