"""The latency solve: widths from the model, measured whole, the target corrected by the miss.

``budget.solve_widths`` scales the criterion's per-group ratios by bisection against the
model's predicted latency, over widths on the measured grid less each group's *dominated*
widths (no faster than a wider one: widths the backend runs badly are avoided because they
were measured), judged beside dense neighbours and, for a second plan, beside the plan found;
each plan is widened where a wider width is predicted no slower beside the rest of it, and
the plan keeping more weights wins. The result is then measured whole on the
backend, interleaved with the dense model; unless it lands within :data:`AIM` of the tolerance
(:data:`TOLERANCE`, relative; the other half is headroom for the next timing's noise), the
target is corrected by the miss and the widths solved again, up to :data:`CORRECTIONS` times,
each step printed and recorded; the closest plan wins. A target below the model's floor is
refused only if the narrowest plan, timed whole, is above it too.
"""
from __future__ import annotations

import statistics

from ..budget import LATENCY_AIM as AIM  # a solve is accepted at once within AIM x the tolerance
from ..budget import LATENCY_TOLERANCE as TOLERANCE  # noqa: F401  (the package exports it)

CORRECTIONS = 4  # solves at most: the first plus three corrected targets


def solve(lat, budget, search, choices) -> tuple[dict[str, int], dict]:
    """Solve with ``search(target) -> widths``, measure with ``lat.check``, correct, solve again."""
    target, best, steps = budget.fraction, None, []
    for i in range(CORRECTIONS):
        widths = search(target)
        predicted = lat.fraction(widths)
        real = lat.check(widths)
        miss = real["fraction"] - budget.fraction
        step = {"iteration": i + 1, "solver_target": target, "predicted": predicted, "measured": real["fraction"],
                "measured_ms": real["ms"], "dense_ms": real["dense_ms"], "widths": widths}
        steps.append(step)
        lat.spec.log(f"solve {i + 1}: aim at {target:.3f} of dense, predicted {predicted:.3f}, measured "
                     f"{real['fraction']:.3f} ({real['ms']:.4f} ms vs dense {real['dense_ms']:.4f} ms), target "
                     f"{budget.fraction:.3f}")
        if best is None or abs(miss) < abs(best["measured"] - budget.fraction):
            best = step
        # accepted at once only near the middle of the tolerance: a plan measured at its edge lands outside
        # it in the next timing as often as not (VGG-16 at batch 1 on one core: 0.328 for 0.3, then 0.343)
        if abs(miss) <= AIM * budget.tolerance:
            break
        if i + 1 < CORRECTIONS:
            # the backend runs these widths k = measured / predicted times the model's guess: aim at F / k,
            # k averaged over the solves so far (a noisy timing does not swing the next aim alone)
            ks = [s["measured"] / s["predicted"] for s in steps if s["predicted"] > 0]
            k = statistics.fmean(ks) if ks else 1.0
            aim = min(1.0, max(1e-3, budget.fraction / k))
            if abs(aim - target) < 1e-4 and step["widths"] == search(aim):
                break  # the correction would give the same widths again
            target = aim
            lat.spec.log(f"missed by {miss:+.3f} (tolerance {budget.tolerance:.3f}); measured/predicted = {k:.3f}, "
                         f"aiming at {target:.3f} of the model's prediction instead")
    met = abs(best["measured"] - budget.fraction) <= budget.tolerance
    if not met:
        lat.spec.log(f"warning: best plan measured {best['measured']:.3f} of dense, outside {budget.fraction:.3f} "
                     f"+/- {budget.tolerance:.3f} after {len(steps)} solves (noisy timing or a coarse grid)")
    report = {"target": budget.fraction, "tolerance": budget.tolerance, "met": met, "solves": steps,
              "chosen": steps.index(best) + 1, "choices": choices}
    return best["widths"], report
