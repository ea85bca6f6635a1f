"""SMOEA: sub-network multi-objective evolutionary filter pruning (our reading of the seed
paper; its full text was not available).

Blocks: the prunable groups, in model order, cut into runs of ``--group-size``
consecutive groups; blocks are searched one at a time, the one whose layers hold the most
parameters first.

For a block, NSGA-II (``compressor.criteria.nsga``) searches binary keep-masks over all its
filters: uniform or two-point crossover, bit-flip mutation (default rate 1 / filters),
binary tournaments on rank and crowding. The initial population comes from L1 rankings:
member i keeps the top share f_i of every group's filters by L1 norm, f_i spread evenly
from 1 down to the share the budget allows; members 1, 2, ... are replaced by the
allocations of the best global Torch-Pruning peers (``--peer-seeds``, default tp-lamp and
tp-l1-global: their widths for the whole budget, each group keeping its top filters by L1),
so the search starts from how the strongest peers spread the budget over the layers. A
group always keeps at least one filter.
Objectives (both minimised): ``-accuracy`` (or the loss, ``--objective loss``) on the
first ``--search-samples`` validation images, and the kept fraction of the budget's metric
(parameters or MACs) of the whole model; under a latency budget, the latency model's
predicted fraction of the dense latency (``compressor.latency``: measured per-layer tables),
so the search trades accuracy against time on the backend, and the pipeline measures the
chosen plan whole. The search aims at the target corrected by how far the backend ran the
uniform reference plan from its prediction (:func:`search_budget`), as the solver corrects.

Budget share: the reference allocation is the uniform one (every group pruned by the same
ratio, as L1's). A candidate *meets its block's share* when the whole model, with earlier
blocks as chosen, this block as the candidate and later blocks at the reference widths,
keeps no more than the budget. From the final front the most accurate candidate that
meets its share is chosen (or the most accurate feasible one of the population); filters
of the block are then added back by L1 while the share still holds, and kept only if that
does not worsen the objective on the search images (unused share passes to later blocks),
except in the last block when it would otherwise miss the budget. ``--round-to`` does
not apply: widths are whatever the search keeps.

Evaluation is the hot path (``compressor.criteria.subnet``): the activations at the block's input are
computed once per validation batch, and each candidate runs only the rest of the network,
with masks as channel multipliers. After each block the chosen filters are masked
(zeroed, and held at zero while training) and the model is fine-tuned for
``--step-epochs``; the pipeline's fine-tuning follows the last block.

The state is saved after every generation (``smoea-state.pt``, with the weights at the
start of the block in ``smoea-weights.pt``, written before the state that points at
them); ``--resume`` continues from it and, with the same seed, ends where an unbroken run
ends. Under a latency budget the search keeps each group on the latency model's fast widths (its
measured grid, less any width a wider one runs no slower beside dense neighbours): a width between the grid's points
is only interpolated, and the backend may run it far slower (on ONNX Runtime's CPU provider,
Conv-4 plans with 33 and 34 channels measured 0.61 of the dense latency where the model said
0.50; on the grid, 0.46-0.48). A mutated group's count rounds to the grid width below or above at
random, with the chance that keeps its count on average, so one-bit mutations still move widths.
After the last block the whole model must keep the budget within its tolerance,
or the run stops with a budget error. ``--max-ratio`` bounds only the reference
allocation; the search itself may prune a group further. Fronts go to
``smoea-fronts.json`` and ``smoea-fronts.png``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..budget import Budget, CostModel, latency_cost, solve_widths
from ..data import batches as data_batches
from ..data import val_subset
from ..errors import BudgetError, CompressorError
from ..files import atomic_path, failpoint, write_json
from ..plan import PruningPlan
from ..surgery import Graph
from ..train import autocast, fit
from . import CriterionConfig, PlanRequest, masking, nsga, option, register, train_config
from .baselines import filter_l1
from .peers import global_allocation
from .subnet import Split

STATE, WEIGHTS = "smoea-state.pt", "smoea-weights-{block}.pt"


def blocks_by_size(graph: Graph, group_size: int) -> list[list[str]]:
    """Runs of ``group_size`` consecutive groups, the ones holding the most parameters first."""
    names = graph.names()
    blocks = [names[i:i + group_size] for i in range(0, len(names), group_size)]

    def size(block):  # only the group's rows of a layer wider than the group (after a concatenation)
        return sum(c.index.numel() * c.tensor[0].numel()
                   for g in block for c in masking.carriers(graph, graph.group(g)))

    return sorted(blocks, key=size, reverse=True)  # stable: equal sizes keep model order


def search_groups(graph: Graph, block: list[str], budget) -> list:
    """The block's groups as the search sees them: under a latency budget, widths off the latency model's fast
    widths (its grid, less those no faster than a wider one beside dense neighbours) are forbidden, so repairs,
    seeds and the top-up land on measured widths that run as priced. The slow ones must go: the top-up
    (:func:`_fit_share`) drops channels only while the predicted time falls, and stalls on a slow width (with
    them allowed, Conv-4's SMOEA kept two groups whole at 0.3 of dense latency and missed its budget)."""
    groups = [graph.group(g) for g in block]
    lat = budget.latency if budget.metric == "latency" else None
    if lat is None or not hasattr(lat, "choices"):
        return groups
    out = []
    for group in groups:
        legal = group.legal_widths()
        fast = set(lat.choices({group.name: legal})[group.name])
        out.append(replace(group, forbidden=set(group.forbidden) | (set(legal) - fast),
                           reason=group.reason or "off the latency table's fast widths"))
    return out


def search_budget(budget: Budget, reference) -> Budget:
    """The budget as the search prices it. Under a latency budget the search sees only the latency model's
    prediction, which the backend can miss by a steady factor (ResNet-20 in int8: its narrowest plan predicted
    0.56 of dense, measured 0.38): the reference plan (uniform, solved and timed whole, ``reference``: its
    :class:`~compressor.budget.Solution`) gives the factor k = measured / predicted, and the search aims at the
    target / k of the model's prediction, as the solver's correction does."""
    report = reference.fractions.get("latency") if budget.metric == "latency" else None
    if not report:
        return budget
    step = report["solves"][report["chosen"] - 1]
    if not step["predicted"] or not step["measured"]:
        return budget
    return budget.step(min(1.0, budget.fraction * step["predicted"] / step["measured"]))


def _nearest_legal(group, width: int) -> int:
    return min(group.legal_widths(), key=lambda w: (abs(w - width), w))


class BlockEvaluator:
    """Scores keep-masks of one block: prefix activations cached once, suffix per candidate."""

    def __init__(self, graph: Graph, block: list[str], data, device, samples: int, metric: str,
                 objective: str, fixed_widths: dict[str, int], cost: CostModel, batch_size: int = 512):
        self.graph, self.block, self.device = graph, block, device
        self.metric, self.objective, self.fixed, self.cost = metric, objective, fixed_widths, cost
        self.sizes = [graph.group(g).width for g in block]
        self.split = Split(graph, block)
        subset = val_subset(data, samples)
        batches = data_batches(subset, "val", batch_size, device)
        graph.model.eval()
        with torch.no_grad(), autocast(device):
            self.cache = [(self.split.cut(x), y) for x, y in batches]
        self.n = len(subset.val_y)
        self.evaluations, self.seconds = 0, 0.0

    def masks(self, genome: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.block, genome.split(self.sizes)))

    def widths(self, genome: torch.Tensor) -> dict[str, int]:
        return self.fixed | {g: int(m.sum()) for g, m in self.masks(genome).items()}

    def kept(self, genome: torch.Tensor) -> float:
        return self.cost.fractions(self.widths(genome))[self.metric]

    @torch.no_grad()
    def quality(self, genome: torch.Tensor) -> tuple[float, float]:
        """(accuracy, mean loss) of the model with this block masked by ``genome``."""
        gates = {g: m.to(self.device, torch.float32) for g, m in self.masks(genome).items()}
        correct = torch.zeros((), device=self.device)
        loss = torch.zeros((), device=self.device)
        for cut, y in self.cache:
            with autocast(self.device):
                logits = self.split.run(cut, gates)
            correct += (logits.argmax(1) == y).sum()
            loss += F.cross_entropy(logits.float(), y, reduction="sum")
        return correct.item() / self.n, loss.item() / self.n

    def __call__(self, genomes: list[torch.Tensor]) -> list[nsga.Point]:
        """Objectives of each genome; under torchrun the ranks score a share each and gather them in order."""
        start = time.perf_counter()
        points = []
        for genome in genomes[distributed.shard(len(genomes))]:
            accuracy, loss = self.quality(genome)
            points.append((-accuracy if self.objective == "accuracy" else loss, self.kept(genome)))
        points = [p for part in distributed.all_gather(points) for p in part]
        self.evaluations += len(genomes)
        self.seconds += time.perf_counter() - start
        return points


def _seed_population(scores: list[torch.Tensor], size: int, lowest: float, groups=None) -> list[torch.Tensor]:
    """Member i keeps the top share f_i of each group by L1, f_i evenly from 1 down to ``lowest``.

    With ``groups`` (the block's Group objects), each group picks its keep set itself
    (``Group.choose``), so seeds respect its layout constraints (grouped convolutions)."""
    population = []
    for i in range(size):
        share = 1.0 - (1.0 - lowest) * i / max(size - 1, 1)
        parts = []
        for j, s in enumerate(scores):
            width = max(1, round(share * s.numel()))
            group = groups[j] if groups is not None else None
            if group is not None and hasattr(group, "legal_widths"):
                width = min(group.legal_widths(), key=lambda w: (abs(w - width), w))
            parts.append(masking.keep_mask(s, width, group))
        population.append(torch.cat(parts))
    return population


def _legalise(group, part: torch.Tensor, score: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """``part`` as a keep set its group allows (grouped convs, ``Group.check``): the legal width nearest
    to its count (or the next one ``down`` / ``up``; ``random``: the one below or above with the chance that
    keeps the count on average, drawn from a hash of the bits, so the same genome always gets the same width),
    chosen by the group, kept channels first, then by L1. Bit flips know nothing of grouped convs; this is
    where a genome becomes a legal plan (our choice). Under a latency budget the legal widths are a grid
    some channels apart, and rounding to the nearest would undo nearly every one-bit mutation."""
    check = getattr(group, "check", None)
    keep = torch.nonzero(part).flatten().tolist()
    if check is None or check(keep) is None:
        return part
    legal, n = group.legal_widths(), len(keep)
    if rounding == "down":
        width = max([w for w in legal if w <= n] or legal[:1])
    elif rounding == "up":
        width = min([w for w in legal if w >= n] or legal[-1:])
    elif rounding == "random":
        below = max([w for w in legal if w <= n] or legal[:1])
        above = min([w for w in legal if w >= n] or legal[-1:])
        digest = hashlib.blake2b(part.numpy().tobytes(), digest_size=8).digest()
        draw = int.from_bytes(digest, "big") / 2 ** 64
        width = above if above != below and draw < (n - below) / (above - below) else below
    else:
        width = min(legal, key=lambda w: (abs(w - n), w))
    s = score.float()
    preference = 2 * part.float() + (s - s.min()) / (s.max() - s.min() + 1e-12)  # kept ones above any other
    out = torch.zeros_like(part)
    out[group.choose(preference, width)] = True
    return out


def _repair_factory(sizes: list[int], scores: list[torch.Tensor], groups=None, rounding: str = "nearest"):
    """A repair keeping at least one filter per group and, with ``groups``, only legal keep sets."""
    best = [int(s.argmax()) for s in scores]

    def repair(genome: torch.Tensor) -> torch.Tensor:
        parts = list(genome.clone().split(sizes))
        for j, (part, b) in enumerate(zip(parts, best)):
            if not part.any():
                part[b] = True
            if groups is not None:
                parts[j] = _legalise(groups[j], part, scores[j], rounding)
        return torch.cat(parts)

    return repair


def _fit_share(genome: torch.Tensor, evaluator: BlockEvaluator, scores: torch.Tensor, share: float,
               groups=None) -> torch.Tensor:
    """Drop the lowest-L1 filters until the share holds, then add the best dropped ones while it still holds.

    Each step is made legal for its group (a grouped conv may drop or add a whole unit at once; under a latency
    budget, a group moves between its fast widths). ``groups``: :func:`search_groups` (default: the graph's)."""
    genome = genome.clone()
    graph = getattr(evaluator, "graph", None)
    if groups is None and graph is not None:
        groups = [graph.group(g) for g in evaluator.block]
    parts = list(scores.split(evaluator.sizes))
    down = _repair_factory(evaluator.sizes, parts, groups, "down")
    up = _repair_factory(evaluator.sizes, parts, groups, "up")
    current = evaluator.kept(genome)
    for i in torch.argsort(scores).tolist():  # lowest first
        if current <= share:
            break
        if not genome[i]:
            continue
        trial = genome.clone()
        trial[i] = False
        trial = down(trial)
        kept = evaluator.kept(trial)
        if kept < current:  # not when it would empty a group
            genome, current = trial, kept
    for i in torch.argsort(scores, descending=True).tolist():  # best first
        if not genome[i]:
            trial = genome.clone()
            trial[i] = True
            trial = up(trial)
            if evaluator.kept(trial) <= share:
                genome = trial
    return genome


def _genome_at(widths: dict[str, int], l1: list[torch.Tensor], groups) -> torch.Tensor:
    """The block's keep-mask with each group at (the legal width nearest) ``widths``, keeping its top-L1 filters."""
    return torch.cat([masking.keep_mask(scores, _nearest_legal(group, widths[group.name]), group)
                      for scores, group in zip(l1, groups)])


def _or_reference(genome: torch.Tensor, evaluator, l1: list[torch.Tensor], groups, reference: dict[str, int],
                  budget) -> tuple[torch.Tensor, float | None]:
    """The block's genome, or, where it ends beyond the tolerance over the share, the reference plan's widths
    (L1's filters) if they keep less: the top-up drops channels only while the predicted cost falls, and can stall
    on a width no faster beside its neighbours (Conv-4 at 0.3 of dense latency: 0.375, in 1 of 3 seeds). Returns
    the genome and, where it fell back, the cost it had."""
    kept = evaluator.kept(genome)
    if kept <= budget.fraction + budget.tolerance:
        return genome, None
    planned = _genome_at(reference, l1, groups)
    return (planned, kept) if evaluator.kept(planned) < kept else (genome, None)


def _choose(picked: torch.Tensor, picked_point: nsga.Point | None, evaluator: BlockEvaluator, scores: torch.Tensor,
            share: float, land_within: float | None, groups=None) -> torch.Tensor:
    """The search's pick topped up by L1 to the share, unless that worsens the objective and the budget
    does not need it (``land_within``: the last block's tolerance). Unused share passes to later blocks."""
    genome = _fit_share(picked, evaluator, scores, share, groups)
    if picked_point is None or torch.equal(genome, picked):
        return genome
    (topped, _), = evaluator([genome])
    must_land = land_within is not None and picked_point[1] < share - land_within
    return picked if topped > picked_point[0] and not must_land else genome


def _save_state(folder: Path | None, state: dict, model: torch.nn.Module | None = None) -> None:
    """Commit the search state, with the weights its block starts from, as one step.

    With ``model``, the block's start weights go first to a file named for the block;
    the state, written last, names that file, and only then are other blocks' weight files
    deleted. A kill at any point leaves a state whose weights file exists and is the right one.
    """
    if folder is None:
        return
    weights = WEIGHTS.format(block=state["block"])
    if model is not None:
        with atomic_path(folder / weights) as tmp:
            torch.save(model.state_dict(), tmp)
        failpoint("smoea-weights-written")
    with atomic_path(folder / STATE) as tmp:
        torch.save(state | {"weights": weights}, tmp)
    for old in folder.glob(WEIGHTS.format(block="*")) if distributed.is_main() else ():
        if old.name != weights:
            old.unlink(missing_ok=True)


def _load_state(folder: Path) -> tuple[dict, dict]:
    """The saved state and the weights it names, or one clear error."""
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file: say which and stop
        raise CompressorError(f"cannot read the smoea state in {folder}: {e}") from None
    weights = state.get("weights") if isinstance(state, dict) else None
    block = state.get("block") if isinstance(state, dict) else None
    # the state names its weights file; only the name this code writes for its block is read (no other path)
    if not isinstance(block, int) or isinstance(block, bool) or weights != WEIGHTS.format(block=block):
        raise CompressorError(f"the smoea state in {folder} is not one this code wrote (weights file {weights!r}); "
                              "delete it to redo the search")
    try:
        return state, torch.load(folder / weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CompressorError(f"cannot read the smoea state in {folder}: {e}") from None


@dataclass(frozen=True)
class SMOEAConfig(CriterionConfig):
    """Sub-network multi-objective evolutionary search: NSGA-II over keep-masks, block by block."""

    group_size: int = option(1, "consecutive prunable layers searched together", flag="--group-size", integer=True,
                             low=1)
    population: int = option(32, "candidates per generation", flag="--population", integer=True, low=4)
    generations: int = option(30, "generations per block", flag="--generations", integer=True, low=0)
    crossover: str = option("uniform", "crossover of two masks", flag="--crossover", choices=("uniform", "two-point"))
    mutation: float | None = option(None, "bit-flip probability", flag="--mutation", low=0, high=1, optional=True,
                                    shown_default="1 / filters in the group")
    objective: str = option("accuracy", "what the search maximises", flag="--objective", choices=("accuracy", "loss"))
    search_samples: int = option(2048, "validation images that score a candidate", flag="--search-samples",
                                 integer=True, low=1)
    step_epochs: int = option(1, "training epochs between blocks", flag="--step-epochs", integer=True, low=0)
    peer_seeds: str = option("tp-lamp,tp-l1-global", "global Torch-Pruning peers whose allocations join the first "
                             "population (comma-separated, or none)", flag="--peer-seeds")

    def check(self) -> None:
        from .peers import GLOBAL_PEERS

        bad = [n for n in self.peers() if n not in GLOBAL_PEERS]
        if bad:
            raise CompressorError(f"--peer-seeds takes {', '.join(GLOBAL_PEERS)} or none, not {', '.join(bad)}")

    def peers(self) -> list[str]:
        text = self.peer_seeds.strip()
        return [] if text in ("", "none") else [n.strip() for n in text.split(",") if n.strip()]


@register("smoea", config=SMOEAConfig)
def smoea(request: PlanRequest, config: SMOEAConfig) -> PruningPlan:
    if request.data is None or len(request.data.val_y) == 0:
        raise CompressorError("the smoea criterion scores candidates on a validation split (--val-fraction > 0)")
    population, generations = config.population, config.generations
    group_size, samples = config.group_size, config.search_samples
    objective, kind = config.objective, config.crossover
    graph, model, budget, device = request.traced(), request.model, request.budget, request.device
    out = Path(request.out_dir) if request.out_dir is not None else None
    folder = request.state_dir()
    step_epochs = config.step_epochs
    settings = {"population": population, "generations": generations, "group_size": group_size, "seed": request.seed,
                "samples": samples, "objective": objective, "crossover": kind,
                "budget": [budget.metric, budget.fraction],
                "mutation": config.mutation, "max_ratio": request.max_ratio, "peer_seeds": config.peers(),
                "train": train_config(request, step_epochs, request.seed).as_dict()}
    cost = CostModel(graph, latency_cost(budget, graph))
    solved = solve_widths(graph, budget, None, 1, request.max_ratio)
    reference, budget = solved.widths, search_budget(budget, solved)  # the budget as the search prices it
    peer_widths = {n: global_allocation(graph, n, budget, 1, request.max_ratio) for n in config.peers()}
    blocks = blocks_by_size(graph, group_size)
    masks = masking.full_masks(graph)
    saved = {"block": 0, "masks": masks, "fronts": [], "search": None, "settings": settings}
    resuming = request.resume and folder is not None and (folder / STATE).is_file()
    if request.resume and not resuming:
        print(f"smoea: no saved search state in {folder}; searching from the first block")
    if resuming:
        saved, weights = _load_state(folder)
        if saved.get("settings") != settings:
            raise CompressorError(f"--resume with other settings than the interrupted run: {saved.get('settings')} "
                                  f"vs {settings}")
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise CompressorError(f"the saved smoea weights in {folder} do not fit this model: {e}") from None
        masks = saved["masks"]
        masking.zero_masked(graph, masks)
        print(f"smoea: resuming at block {saved['block'] + 1}/{len(blocks)}")
    else:
        _save_state(folder, saved, model)
    fronts, evaluations, eval_seconds = saved["fronts"], 0, 0.0
    for b in range(saved["block"], len(blocks)):
        block = blocks[b]
        chosen = {g: int(m.sum()) for g, m in masks.items()}
        fixed = reference | {g: chosen[g] for blk in blocks[:b] for g in blk}
        evaluator = BlockEvaluator(graph, block, request.data, device, samples, budget.metric, objective, fixed, cost)
        l1 = filter_l1(graph, [graph.group(g) for g in block])
        block_l1 = [l1[g] for g in block]
        scores = torch.cat(block_l1)
        groups = search_groups(graph, block, budget)
        repair = _repair_factory(evaluator.sizes, block_l1, groups,
                                 "random" if budget.metric == "latency" else "nearest")
        lowest = min(reference[g] / graph.group(g).width for g in block)
        g = torch.Generator().manual_seed(request.seed * 1000 + b)
        state = nsga.SearchState.from_dict(saved["search"]) if saved["search"] is not None else None

        def on_generation(s, b=b):
            _save_state(folder, {"block": b, "masks": masks, "fronts": fronts, "search": s.to_dict(),
                                 "settings": settings})
            if request.on_progress is not None:  # tests interrupt here
                request.on_progress(b, s)

        started = time.perf_counter()
        seeds = _seed_population(block_l1, population, lowest, groups)
        for k, widths in enumerate(peer_widths.values(), start=1):  # beside the L1 shares: the peers' allocations
            if k < len(seeds):
                seeds[k] = _genome_at(widths, block_l1, groups)
        result = nsga.search(evaluator, seeds, generations, g,
                             kind, config.mutation, repair, state=state,
                             reference=(0.0, 1.0001) if objective == "accuracy" else None,
                             on_generation=on_generation)
        saved["search"] = None
        front = nsga.non_dominated_sort(result.objectives)[0]
        feasible = [i for i in front if result.objectives[i][1] <= budget.fraction] or \
                   [i for i in range(len(result.objectives)) if result.objectives[i][1] <= budget.fraction]
        pick = min(feasible, key=lambda i: result.objectives[i]) if feasible else 0
        genome = _choose(result.population[pick], result.objectives[pick] if feasible else None, evaluator, scores,
                         budget.fraction, budget.tolerance if b == len(blocks) - 1 else None, groups)
        genome, fallback = _or_reference(genome, evaluator, block_l1, groups, reference, budget)
        if fallback is not None:
            print(f"smoea block {b + 1}/{len(blocks)}: the search and its top-up ended at {fallback:.3f} of "
                  f"{budget.metric}, over {budget.fraction:.3f} + {budget.tolerance:.3f}; the block keeps the "
                  f"reference plan's widths ({evaluator.kept(genome):.3f})")
        accuracy, loss = evaluator.quality(genome)
        for name, m in evaluator.masks(genome).items():
            masks[name] = m.clone()
        masking.zero_masked(graph, masks)
        evaluations += evaluator.evaluations
        eval_seconds += evaluator.seconds
        order = sorted(front, key=lambda i: result.objectives[i][1])
        points = [{"objective": result.objectives[i][0], "kept": result.objectives[i][1],
                   "widths": {n: int(m.sum()) for n, m in evaluator.masks(result.population[i]).items()}}
                  for i in order]
        measured = _measure_front(budget, evaluator, [result.population[i] for i in order], genome)
        for p, m in zip(points, measured.get("front", [])):
            p["measured"] = m
        fronts.append({"block": block, "objective": objective, "front": points,
                       "chosen": {"accuracy": accuracy, "loss": loss, "kept": evaluator.kept(genome),
                                  **({"stalled_at": fallback} if fallback is not None else {}),
                                  "widths": {n: int(m.sum()) for n, m in evaluator.masks(genome).items()},
                                  **({"measured": measured["chosen"]} if measured else {})},
                       "history": result.history, "evaluations": result.evaluations,  # with any before a resume
                       "seconds": time.perf_counter() - started,
                       "candidates_per_second": evaluator.evaluations / max(evaluator.seconds, 1e-9)})
        print(f"smoea block {b + 1}/{len(blocks)} {block}: {evaluator.evaluations} candidates in "
              f"{evaluator.seconds:.1f}s ({fronts[-1]['candidates_per_second']:.1f}/s); chosen val accuracy "
              f"{accuracy:.2%}, {evaluator.kept(genome):.3f} of {budget.metric}")
        del evaluator
        if b < len(blocks) - 1 and step_epochs > 0:
            fit(model, request.data, train_config(request, step_epochs, request.seed + b), device,
                desc=f"smoea block {b + 1}", hooks=masking.hooks(graph, masks),
                state=request.stage(f"smoea-block{b + 1}"))
        _save_state(folder, {"block": b + 1, "masks": masks, "fronts": fronts, "search": None, "settings": settings},
                    model)
    kept = cost.fractions(masking.widths(masks))[budget.metric]
    if abs(kept - budget.fraction) > budget.tolerance:
        raise BudgetError(f"smoea ended at {kept:.4f} of {budget.metric}{' (predicted)' * (budget.metric == 'latency')}"
                          f", not within {budget.tolerance:.4g} of {budget.fraction:.4g}: try a larger --population or "
                          "more --generations")
    request.train_epochs = (len(blocks) - 1) * step_epochs
    request.report["smoea"] = {"blocks": [f["block"] for f in fronts], "fronts": fronts, "settings": settings,
                               "search_target": budget.fraction,
                               "train_epochs": (len(blocks) - 1) * step_epochs,
                               "evaluations": sum(f["evaluations"] for f in fronts),
                               "search_seconds": sum(f["seconds"] for f in fronts),
                               "candidates_per_second": evaluations / max(eval_seconds, 1e-9) if evaluations else None}
    if out is not None:
        write_fronts(fronts, out)
    return masking.to_plan(masks)


def _measure_front(budget, evaluator: BlockEvaluator, genomes: list[torch.Tensor], chosen: torch.Tensor) -> dict:
    """Under a latency budget, each front point and the chosen one timed whole on the backend (the model with
    earlier blocks as chosen and later ones at the reference widths), interleaved with the dense model:
    ``{"front": [fraction of dense, ...], "chosen": fraction}``; ``{}`` for other budgets."""
    if budget.metric != "latency" or budget.latency is None:
        return {}
    configs = {f"p{k}": evaluator.widths(g) for k, g in enumerate(genomes)} | {"chosen": evaluator.widths(chosen)}
    fractions = budget.latency.measure(configs)["fraction"]
    return {"front": [fractions[f"p{k}"] for k in range(len(genomes))], "chosen": fractions["chosen"]}


def write_fronts(fronts: list[dict], out: Path) -> None:
    """smoea-fronts.json, and smoea-fronts.png: the final front of each block, chosen points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(out / "smoea-fronts.json", fronts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = any("measured" in p for f in fronts for p in f["front"])
    for f in fronts:
        pts = [(p["kept"], -p["objective"]) for p in f["front"]]  # accuracy, or -loss
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=", ".join(f["block"]))
        chosen = f["chosen"]["accuracy"] if f["objective"] == "accuracy" else -f["chosen"]["loss"]
        ax.plot([f["chosen"]["kept"]], [chosen], marker="*", ms=12, color=line.get_color())
        if timed:  # the same points as measured on the backend
            ax.plot([p.get("measured") for p in f["front"]], [p[1] for p in pts], marker="x", ls="none",
                    color=line.get_color())
    what = ("fraction of dense latency: predicted (dot, star), measured (x)" if timed
            else "kept fraction of the whole model (later blocks at the reference widths)")
    ax.set(xlabel=what,
           ylabel="validation accuracy (or -loss)", title="SMOEA: final front per block (star: chosen)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "smoea-fronts.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
