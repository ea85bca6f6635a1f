"""PruningPlan: the only thing a criterion hands to surgery.

For each prunable group (named by its first conv/linear layer), the indices of the
output channels that stay. A plan is plain data: it can be written to JSON, read back,
compared, and applied to a fresh copy of the same architecture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .errors import CompressorError


def top_channels(score: torch.Tensor, width: int, group=None) -> list[int]:
    """The ``width`` highest-scoring channels, ascending: the one answer to "scores to a keep set".

    With the traced ``group`` (surgery.Group), the group chooses the best *legal* set (grouped
    convs may need whole units, or as many channels from each conv group); else plain top-k.
    """
    if group is not None:
        return sorted(group.choose(score, width))
    return sorted(torch.topk(score.detach().float().cpu(), k=width, sorted=False).indices.tolist())


@dataclass
class PruningPlan:
    keep: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_scores(cls, scores: dict[str, torch.Tensor], widths: dict[str, int], graph=None) -> "PruningPlan":
        """Keep the ``widths[g]`` highest-scoring channels of each group ``g``.

        Pass the traced ``graph`` (surgery.Graph) on models with grouped convs: its groups'
        ``choose`` picks the best *legal* set; without it the choice is plain top-k.
        """
        return cls({name: top_channels(scores[name], width, graph.group(name) if graph is not None else None)
                    for name, width in widths.items()})

    @classmethod
    def first_channels(cls, widths: dict[str, int], graph=None) -> "PruningPlan":
        """Keep the first ``widths[g]`` channels: the shape of a pruned model, with no choice of which.

        With ``graph``, the first *legal* channels (a grouped conv may need some from each group).
        """
        if graph is not None:
            full = graph.widths()
            return cls.from_scores({n: -torch.arange(full[n], dtype=torch.float) for n in widths}, widths, graph)
        return cls({name: list(range(width)) for name, width in widths.items()})

    def widths(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.keep.items()}

    def to_json(self) -> str:
        return json.dumps({"format": "compressor.plan/1", "keep": self.keep})

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
            keep = {str(k): [int(i) for i in v] for k, v in data["keep"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CompressorError(f"not a pruning plan: {exc}") from None
        return cls(keep)
