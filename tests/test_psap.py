from dataclasses import replace

import pytest
import torch

from compressor import data as datasets
from compressor import models, surgery
from compressor.budget import Budget, CostModel
from compressor.criteria import PlanRequest, make_plan, masking
from compressor.criteria.psap import GradientWatch, PSAPConfig, protect, sparsity, step_scores
from compressor.train import TrainConfig, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small():
    return datasets.from_tensors("small", *datasets.synthetic(n_train=320, n_test=64), val_fraction=0.2)


def psap_request(name, data, fraction=0.5, metric="macs", steps=2):
    torch.manual_seed(0)
    model = models.create(name, 10, 3)
    x = data.example_inputs()
    return PlanRequest(model, x, Budget(metric, fraction), data=data), PSAPConfig(steps=steps, step_epochs=1)


def test_sparser_layer_gets_higher_ratio(small):
    request, config = psap_request("conv4", small, steps=1)
    graph = request.traced()
    target = graph.groups[1]
    with torch.no_grad():  # zero 70% of one layer's weights: it is now the sparsest
        w = graph.module(target.name).weight
        w[torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.7] = 0
    found = sparsity(graph, masking.full_masks(graph))
    assert max(found, key=found.get) == target.name and found[target.name] > 0.7
    make_plan("psap", request, config)
    ratios = request.report["psap"]["steps"][0]["ratios"]
    assert max(ratios, key=ratios.get) == target.name
    assert ratios[target.name] > max(r for n, r in ratios.items() if n != target.name)


def test_masked_filter_with_large_gradient_is_restored_and_budget_holds(small):
    graph = surgery.trace(models.create("conv4", 10, 3), small.example_inputs())
    masks = masking.full_masks(graph)
    name = graph.groups[2].name
    masks[name][:32] = False  # half of a 64-wide group masked
    grads = {g: torch.full((m.numel(),), 1.0) + 0.1 * torch.rand(m.numel()) for g, m in masks.items()}
    grads[name][5] = 50.0  # masked channel 5 stands out
    # channel 32 least important kept
    importance = {g: torch.arange(m.numel(), dtype=torch.float) for g, m in masks.items()}
    new, swaps = protect(masks, grads, importance, z=2.0)
    assert swaps[name] == [(5, 32)]
    assert new[name][5] and not new[name][32]
    assert all(not pairs for g, pairs in swaps.items() if g != name)
    cost = CostModel(graph)
    assert cost.fractions(masking.widths(new)) == cost.fractions(masking.widths(masks))
    # nothing stands out: nothing changes
    grads[name][5] = 1.0
    again, swaps = protect(masks, grads, importance, z=2.0)
    assert not any(swaps.values()) and all(torch.equal(again[g], masks[g]) for g in masks)


@pytest.mark.parametrize("name", ["conv4", "resnet20"])
def test_masked_model_equals_pruned_model(small, name):
    request, config = psap_request(name, small, fraction=0.5)
    plan = make_plan("psap", request, config)
    model, x = request.model.eval(), small.example_inputs()
    graph = request.traced()
    kept = {g: set(idx) for g, idx in plan.keep.items()}
    dropped = 0
    for group in graph.groups:  # masks do not leak: dropped channels are exactly zero after training
        drop = [c for c in range(group.width) if c not in kept[group.name]]
        dropped += len(drop)
        assert all(torch.count_nonzero(t[drop]) == 0 for t in masking.channel_params(graph, group))
    assert dropped > 0
    batch = torch.cat([x, torch.randn(6, *x.shape[1:])])
    pruned = surgery.pruned_copy(model, plan, x).eval()
    with torch.no_grad():
        masked_out, pruned_out = model(batch), pruned(batch)
    torch.testing.assert_close(pruned_out, masked_out, rtol=1e-4, atol=1e-5)


def _every_third_masked(graph):
    masks = masking.full_masks(graph)
    for m in masks.values():
        m[::3] = False
    masking.zero_masked(graph, masks)
    return masks


def test_masks_survive_momentum_and_weight_decay(small):
    model = models.create("vgg11", 10, 3)
    graph = surgery.trace(model, small.example_inputs())
    masks = _every_third_masked(graph)
    fit(model, small, TrainConfig(epochs=1, lr=0.1, weight_decay=5e-3, momentum=0.9), CPU,
        hooks=masking.hooks(graph, masks))
    for group in graph.groups:
        drop = ~masks[group.name]
        params = masking.channel_params(graph, group)
        assert all(torch.count_nonzero(t[drop]) == 0 for t in params)
        assert any(torch.count_nonzero(t[~drop]) > 0 for t in params)  # the kept ones did train


def test_masked_gradients_are_cleared_before_the_optimizer_step(small):
    # Behind conv -> BN -> ReLU a masked channel gets no gradient anyway, so training alone cannot show
    # that the hook clears it. Here every row gets a gradient, and no re-zeroing runs after the step.
    model = models.create("vgg11", 10, 3)
    graph = surgery.trace(model, small.example_inputs())
    masks = _every_third_masked(graph)
    hooks = masking.hooks(graph, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    for _ in range(3):
        for t in model.parameters():
            t.grad = torch.ones_like(t)
        hooks.after_backward()
        opt.step()
    for group in graph.groups:
        drop = ~masks[group.name]
        for t in masking.channel_params(graph, group):
            assert torch.count_nonzero(t[drop]) == 0
            assert torch.count_nonzero(t[~drop]) > 0


def test_restored_channels_survive_the_next_pruning_step(small):
    # --protect-z 0: any masked channel whose gradient beats the kept channels' mean comes back
    request, config = psap_request("conv4", small, fraction=0.3, metric="params", steps=3)
    plan = make_plan("psap", request, replace(config, protect_z=0.0))
    report = request.report["psap"]
    restored = report["restored_per_step"]
    assert restored[0] == 0 and sum(restored) > 0
    assert [s["restored_kept"] for s in report["steps"]] == restored
    assert report["protect_z"] == 0.0
    widths = {g: len(idx) for g, idx in plan.keep.items()}
    assert widths == report["steps"][-1]["widths"]


@pytest.mark.parametrize("name", ["conv4", "vgg11", "resnet20"])
def test_budget_is_met(small, name):
    request, config = psap_request(name, small, fraction=0.25, metric="params")
    dense = surgery.count(request.model, request.example_inputs)
    plan = make_plan("psap", request, config)
    pruned = surgery.pruned_copy(request.model, plan, request.example_inputs)
    kept = surgery.count(pruned, request.example_inputs).fraction_of(dense)["params"]
    assert abs(kept - 0.25) <= 0.01
    report = request.report["psap"]
    assert len(report["steps"]) == 2 and len(report["restored_per_step"]) == 2
    assert report["steps"][0]["target"] == pytest.approx(0.625)


def test_watched_gradient_of_a_masked_filter_drives_its_restoration(small):
    torch.manual_seed(0)
    model = models.create("conv4", 10, 3)
    graph = surgery.trace(model, small.example_inputs())
    first, second = graph.groups[0], graph.groups[1]
    masks = masking.full_masks(graph)
    masks[first.name][:8] = False
    masking.zero_masked(graph, masks)
    with torch.no_grad():  # the next layer leans hard on masked channel 3: the loss wants it back
        graph.module(second.name).weight[:, 3] *= 50
    watch = GradientWatch(graph)
    fit(model, small, TrainConfig(epochs=1, lr=0.01, batch_size=64), CPU, hooks=masking.hooks(graph, masks))
    watch.close()
    grads = watch.mean()[first.name]
    assert (grads[:8] > 0).all()  # masked channels still get a gradient at their consumers' inputs
    assert int(torch.argmax(grads)) == 3
    new, swaps = protect(masks, watch.mean(), {g: torch.rand(m.numel()) for g, m in masks.items()})
    assert swaps[first.name][0][0] == 3 and new[first.name][3]  # the one that stands out most comes back first
    assert masking.widths(new) == masking.widths(masks)


def test_gradient_watch_is_the_mean_absolute_input_gradient_and_skips_overflow_steps():
    """The watch's one-pass L1 norm gives what grad.abs().mean() gives, per channel, averaged over steps,
    and a step whose gradient is not finite (a grad scaler's overflow) is left out, as the optimizer skips it."""
    torch.manual_seed(0)
    model = models.create("conv4", 10, 3).train()
    graph = surgery.trace(model, torch.randn(1, 3, 32, 32))
    consumer = graph.module(graph.groups[1].name)  # reads the first group's channels, exactly
    seen = []

    def record(_module, args):
        args[0].register_hook(lambda g: seen.append(g.clone()))

    handle = consumer.register_forward_pre_hook(record)
    watch = GradientWatch(graph)
    for batch in (8, 5):  # a short last batch counts as one step, like any other
        model(torch.randn(batch, 3, 32, 32)).square().sum().backward()
    name = graph.groups[0].name
    watch._add(name, torch.full_like(seen[0], float("inf")))  # an overflow step
    watch.close()
    handle.remove()
    expected = sum(g.abs().mean((0, 2, 3)) for g in seen) / len(seen)
    assert int(watch.steps[name]) == 2
    torch.testing.assert_close(watch.mean()[name], expected)
    saved = watch.state_dict()
    again = GradientWatch(graph)
    again.load_state_dict(saved)
    again._add(name, seen[0])  # grows its own copy, not the saved one
    watch._add(name, seen[0])
    again.close()
    assert int(saved["steps"][name]) == 2 and int(again.steps[name]) == 3 == int(watch.steps[name])
    torch.testing.assert_close(saved["sums"][name] / 2, expected)


def test_a_group_given_more_channels_takes_back_the_most_wanted_masked_ones(small):
    graph = surgery.trace(models.create("conv4", 10, 3), small.example_inputs())
    name = graph.groups[1].name
    masks = masking.full_masks(graph)
    masks[name][1:9] = False  # channel 0 was restored just now, so it is kept
    masking.zero_masked(graph, masks)
    grads = {g: torch.rand(m.numel(), generator=torch.Generator().manual_seed(1)) for g, m in masks.items()}
    grads[name][1:9] = torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 4.0, 5.0, 6.0])
    scores = step_scores(graph, masks, grads, {name: [0]})
    kept, masked = scores[name][masks[name]], scores[name][1:9]
    assert scores[name][0] == float("inf")
    assert kept.min() >= 0 > masked.max()  # every kept channel outranks every masked one
    assert (torch.topk(masked, 2).indices + 1).tolist() == [2, 4]  # then the largest watched gradients


def test_default_is_one_step_at_the_budget(small):
    """One step by default (the Conv-4 / CIFAR-10 study's choice): it masks to the budget at once and trains once."""
    request, _ = psap_request("conv4", small, fraction=0.5, metric="params")
    dense = surgery.count(request.model, request.example_inputs)
    plan = make_plan("psap", request)
    report = request.report["psap"]
    assert len(report["steps"]) == 1 and report["steps"][0]["target"] == pytest.approx(0.5)
    assert request.train_epochs == 1
    pruned = surgery.pruned_copy(request.model, plan, request.example_inputs)
    assert abs(surgery.count(pruned, request.example_inputs).fraction_of(dense)["params"] - 0.5) <= 0.01
