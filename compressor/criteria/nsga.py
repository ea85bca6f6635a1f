"""NSGA-II over binary genomes (Deb et al., 2002): the search machinery behind SMOEA.

Every objective is minimised. Plain functions on lists of tuples and bool tensors, so
each piece can be checked by hand; ``search`` ties them together with a state that can
be saved after any generation and resumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Point = tuple[float, ...]


def dominates(a: Point, b: Point) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_sort(points: list[Point]) -> list[list[int]]:
    """Fronts of indices: front 0 is dominated by nobody, front k only by fronts < k."""
    dominated_by_me: list[list[int]] = [[] for _ in points]
    count = [0] * len(points)
    for i, a in enumerate(points):
        for j, b in enumerate(points):
            if dominates(a, b):
                dominated_by_me[i].append(j)
            elif dominates(b, a):
                count[i] += 1
    fronts, current = [], [i for i, c in enumerate(count) if c == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in dominated_by_me[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        current = sorted(nxt)
    return fronts


def crowding_distance(points: list[Point], front: list[int]) -> dict[int, float]:
    """Per index of ``front``: the sum over objectives of the normalised gap between its neighbours."""
    distance = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: float("inf") for i in front}
    for k in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: points[i][k])
        lo, hi = points[ordered[0]][k], points[ordered[-1]][k]
        distance[ordered[0]] = distance[ordered[-1]] = float("inf")
        if hi == lo:
            continue
        for prev, cur, nxt in zip(ordered, ordered[1:], ordered[2:]):
            distance[cur] += (points[nxt][k] - points[prev][k]) / (hi - lo)
    return distance


def rank_and_crowding(points: list[Point]) -> tuple[list[int], list[float]]:
    rank, crowd = [0] * len(points), [0.0] * len(points)
    for r, front in enumerate(non_dominated_sort(points)):
        for i, d in crowding_distance(points, front).items():
            rank[i], crowd[i] = r, d
    return rank, crowd


def select(points: list[Point], n: int) -> list[int]:
    """NSGA-II survivors: whole fronts in order, the last one cut by largest crowding distance."""
    chosen = []
    for front in non_dominated_sort(points):
        if len(chosen) + len(front) <= n:
            chosen += front
        else:
            crowd = crowding_distance(points, front)
            chosen += sorted(front, key=lambda i: -crowd[i])[: n - len(chosen)]
            break
    return chosen


def tournament(rank: list[int], crowd: list[float], g: torch.Generator) -> int:
    """Binary tournament: lower rank wins, then larger crowding distance."""
    a, b = torch.randint(len(rank), (2,), generator=g).tolist()
    return a if (rank[a], -crowd[a]) <= (rank[b], -crowd[b]) else b


def crossover(a: torch.Tensor, b: torch.Tensor, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "uniform":
        pick = torch.rand(a.numel(), generator=g) < 0.5
    else:  # two-point: swap the segment between two cut points
        i, j = sorted(torch.randint(a.numel() + 1, (2,), generator=g).tolist())
        pick = torch.zeros(a.numel(), dtype=torch.bool)
        pick[i:j] = True
    return torch.where(pick, b, a), torch.where(pick, a, b)


def mutate(x: torch.Tensor, rate: float, g: torch.Generator) -> torch.Tensor:
    return x ^ (torch.rand(x.numel(), generator=g) < rate)


def hypervolume_2d(points: list[Point], reference: Point) -> float:
    """Area dominated by ``points`` (two minimised objectives) and bounded by ``reference``."""
    front = sorted({p for p in points if p[0] < reference[0] and p[1] < reference[1]})
    area, best_y = 0.0, reference[1]
    for x, y in front:
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def _select_distinct(genomes: list[torch.Tensor], points: list[Point], n: int) -> list[int]:
    """``select`` over distinct genomes first: a copy of a point would crowd a distinct one out of the front."""
    seen, distinct, copies = set(), [], []
    for i, x in enumerate(genomes):
        key = bytes(x.to(torch.uint8).tolist())
        (copies if key in seen else distinct).append(i)
        seen.add(key)
    chosen = [distinct[i] for i in select([points[i] for i in distinct], n)]
    return chosen + copies[: n - len(chosen)]


@dataclass
class SearchState:
    """Everything a search needs to go on after ``generation`` generations: save it, resume it."""

    population: list[torch.Tensor]
    objectives: list[Point]
    generation: int = 0
    rng_state: torch.Tensor | None = None
    evaluations: int = 0
    history: list[dict] = field(default_factory=list)  # per generation: hypervolume, front size

    def to_dict(self) -> dict:
        return {"population": torch.stack(self.population), "objectives": [list(o) for o in self.objectives],
                "generation": self.generation, "rng_state": self.rng_state, "evaluations": self.evaluations,
                "history": self.history}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchState":
        return cls(list(d["population"].unbind(0)), [tuple(o) for o in d["objectives"]], d["generation"],
                   d["rng_state"], d["evaluations"], list(d["history"]))


def search(
    evaluate: Callable[[list[torch.Tensor]], list[Point]],
    initial: list[torch.Tensor],
    generations: int,
    g: torch.Generator,
    crossover_kind: str = "uniform",
    mutation_rate: float | None = None,
    repair: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    reference: Point | None = None,
    state: SearchState | None = None,
    on_generation: Callable[[SearchState], None] | None = None,
) -> SearchState:
    """Run NSGA-II from ``initial`` (or from a saved ``state``) for ``generations`` generations.

    ``on_generation`` sees the state after each generation (to save it); the generator's
    state travels with it, so a resumed search draws the same numbers as an unbroken one.
    """
    if state is None:
        population = [repair(x) for x in initial]
        state = SearchState(population, evaluate(population), evaluations=len(population), rng_state=g.get_state())
        if on_generation is not None:
            on_generation(state)
    else:
        g.set_state(state.rng_state)
    n = len(state.population)
    rate = mutation_rate if mutation_rate is not None else 1.0 / state.population[0].numel()
    while state.generation < generations:
        rank, crowd = rank_and_crowding(state.objectives)
        children = []
        while len(children) < n:
            a, b = (state.population[tournament(rank, crowd, g)] for _ in range(2))
            for child in crossover(a, b, crossover_kind, g):
                children.append(repair(mutate(child, rate, g)))
        children = children[:n]
        merged_x, merged_f = state.population + children, state.objectives + evaluate(children)
        keep = _select_distinct(merged_x, merged_f, n)
        state.population, state.objectives = [merged_x[i] for i in keep], [merged_f[i] for i in keep]
        state.generation += 1
        state.evaluations += len(children)
        front = non_dominated_sort(state.objectives)[0]
        record = {"generation": state.generation, "front_size": len(front)}
        if reference is not None:
            record["hypervolume"] = hypervolume_2d([state.objectives[i] for i in front], reference)
        state.history.append(record)
        state.rng_state = g.get_state()
        if on_generation is not None:
            on_generation(state)
    return state
