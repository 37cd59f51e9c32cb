"""Behaviour of the models in pipeline/models: each test pins one property the issue asks for."""
from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import pipeline.models.baselines
import pipeline.models.gce
import pipeline.models.gexsent
from pipeline.errors import ParamError
from pipeline.models import MODELS, build_model
from pipeline.models.blocks import (
    ContrastiveAlignment,
    GatedSelfAttention,
    MixtureOfExperts,
    MLPHead,
    symmetric_cross_entropy,
    info_nce,
    load_balance_loss,
    route_top_k,
    task_loss,
)
from pipeline.models.gce import RelationFilter, grade_pairs, gram, relation_loss

DIMS = {"text": 12, "visual": 10, "acoustic": 6}
MAX_LEN = {"text": 6, "visual": 4, "acoustic": 7}
SMALL = {  # tiny configs: every test runs in well under a second per model
    "gexsent": dict(d_model=16, n_experts=4, top_k=2, expert_hidden=16, n_heads=2, head_hidden=16, dropout=0.0),
    "gce": dict(visual_d_model=8, acoustic_d_model=8, encoder_layers=1, encoder_heads=2, encoder_ff_dim=16,
                utterance_dim=8, pair_dim=8, fusion_dim=16, head_hidden=16, relation_dim=8, contrastive_dim=8,
                dropout=0.0),
    "text_only": dict(head_hidden=16, dropout=0.0),
    "late_fusion": dict(head_hidden=16, dropout=0.0),
}
ALL_MODELS = sorted(MODELS)
ALL_VARIANTS = ALL_MODELS + ["gce:reference", "gexsent:reference"]  # "<model>:<variant>" for make_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on shared cores OpenMP barriers can stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(name, **overrides):
    """SMALL[name] with overrides; under variant reference without the params only `improved` has, and a narrow
    frame encoder."""
    config = {**SMALL[name], **overrides}
    if name == "gexsent" and config.get("variant") == "reference":
        config = {"lstm_dim": 16, **{k: v for k, v in config.items() if k not in pipeline.models.gexsent.IMPROVED_ONLY}}
    return config


def make_model(name, dims=DIMS, task="regression", num_classes=1, **overrides):
    """A tiny model; name may be "<model>:<variant>"."""
    name, _, variant = name.partition(":")
    if variant:
        overrides["variant"] = variant
    torch.manual_seed(0)
    return build_model(name, dims, task, num_classes, small_config(name, **overrides))


def make_batch(batch_size, dims=DIMS, seed=0, task="regression", num_classes=3):
    """Random features, random lengths (>= 1) with right padding, zeros on padding, labels."""
    generator = torch.Generator().manual_seed(seed)
    batch = {}
    for m in dims:
        lengths = torch.randint(1, MAX_LEN[m] + 1, (batch_size,), generator=generator)
        mask = torch.arange(MAX_LEN[m])[None, :] < lengths[:, None]
        features = torch.randn(batch_size, MAX_LEN[m], dims[m], generator=generator)
        batch[m] = features * mask[..., None]
        batch[f"{m}_mask"] = mask
    if task == "regression":
        batch["label"] = torch.rand(batch_size, generator=generator) * 6 - 3
    else:
        batch["label"] = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return batch


def drop_modality(batch, m, samples):
    """Mark modality m missing for the given samples: all-False mask, zero features."""
    batch = dict(batch)
    batch[f"{m}_mask"] = batch[f"{m}_mask"].clone()
    batch[f"{m}_mask"][samples] = False
    batch[m] = batch[m] * batch[f"{m}_mask"][..., None]
    return batch


def scramble_padding(batch, seed=1):
    """Put large random values on every padded position (including missing modalities)."""
    generator = torch.Generator().manual_seed(seed)
    batch = dict(batch)
    for m in DIMS:
        if m in batch:
            noise = 50 * torch.randn(batch[m].shape, generator=generator)
            batch[m] = torch.where(batch[f"{m}_mask"][..., None], batch[m], noise)
    return batch


def total_loss(out, batch, task="regression"):
    return task_loss(out["pred"], batch["label"], task) + sum(out["aux"].values())


# ----------------------------------------------------------------------------- MoE routing
def test_top_k_routing_picks_the_k_largest_gates_and_weights_sum_to_one():
    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    probs, weights, experts = route_top_k(logits, top_k=3)
    expected = probs.argsort(dim=-1, descending=True)[:, :3]
    assert torch.equal(experts.sort(dim=-1).values, expected.sort(dim=-1).values)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    # weights are the chosen probabilities renormalised, not the raw ones
    chosen = probs.gather(1, experts)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


def test_balance_loss_is_minimal_for_uniform_routing_and_grows_under_collapse():
    n_tokens, n_experts, k = 400, 8, 2
    uniform = torch.full((n_tokens, n_experts), 1.0 / n_experts)
    spread = torch.arange(n_tokens)[:, None] * k + torch.arange(k)  # tokens spread evenly over experts
    assert load_balance_loss(uniform, spread % n_experts).item() == pytest.approx(1.0)

    previous = 1.0
    for sharpness in (1.0, 3.0, 10.0):  # increasingly everything prefers experts 0 and 1
        logits = torch.zeros(n_tokens, n_experts)
        logits[:, :2] = sharpness
        probs, _, experts = route_top_k(logits, k)
        loss = load_balance_loss(probs, experts).item()
        assert loss > previous
        previous = loss
    assert previous == pytest.approx(n_experts / k, rel=1e-2)  # full collapse onto k experts


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_dispatch_and_einsum_routing_agree(top_k):
    torch.manual_seed(0)
    moe = MixtureOfExperts(d_model=8, d_hidden=16, n_experts=4, top_k=top_k)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    results = {}
    for routing in ("dispatch", "einsum"):
        moe.routing = routing
        moe.zero_grad()
        out, stats, per_sample = moe(x, mask)
        balance, load = stats.balance_loss(), stats.routed
        (out.square().sum() + balance).backward()
        results[routing] = (out, balance, load, [p.grad.clone() for p in moe.parameters()])
        # each sample's routing weights sum to its number of real tokens (the k weights sum to 1)
        torch.testing.assert_close(per_sample.sum(-1), mask.sum(-1).float())
    (out_d, bal_d, load_d, grads_d), (out_e, bal_e, load_e, grads_e) = results["dispatch"], results["einsum"]
    torch.testing.assert_close(out_d, out_e)
    torch.testing.assert_close(bal_d, bal_e)
    assert torch.equal(load_d, load_e) and load_d.sum() == mask.sum() * top_k
    for g_d, g_e in zip(grads_d, grads_e):
        torch.testing.assert_close(g_d, g_e)
    assert out_d[~mask].abs().sum() == 0  # padded positions are not routed


# ----------------------------------------------------------------------------- masks and padding
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_changing_padded_positions_changes_no_output(name):
    model = make_model(name)
    batch = drop_modality(make_batch(6), "visual", [1])
    batch = drop_modality(batch, "acoustic", [2])
    scrambled = scramble_padding(batch)
    for mode in ("eval", "train"):  # train mode: the auxiliary losses too (dropout is 0 in SMALL)
        getattr(model, mode)()
        torch.manual_seed(0)
        out = model(batch)
        torch.manual_seed(0)
        out_scrambled = model(scrambled)
        torch.testing.assert_close(out["pred"], out_scrambled["pred"])
        assert out["aux"].keys() == out_scrambled["aux"].keys()
        for key in out["aux"]:
            torch.testing.assert_close(out["aux"][key], out_scrambled["aux"][key])


def test_padding_scramble_is_visible_without_the_mask():
    """Guard for the test above: the scrambled values do reach the model when unmasked."""
    model = make_model("late_fusion").eval()
    batch = make_batch(6)
    unmasked = {**batch, **{f"{m}_mask": torch.ones_like(batch[f"{m}_mask"]) for m in DIMS}}
    scrambled = {**scramble_padding(batch), **{f"{m}_mask": unmasked[f"{m}_mask"] for m in DIMS}}
    assert not torch.allclose(model(unmasked)["pred"], model(scrambled)["pred"])


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_missing_modalities_per_sample(name):
    model = make_model(name)
    batch = make_batch(5)
    batch = drop_modality(batch, "visual", [0, 2])  # sample 0: text only
    batch = drop_modality(batch, "acoustic", [0, 1])  # sample 1: text + visual
    batch = drop_modality(batch, "text", [2, 3])  # sample 2: acoustic only; 3: visual + acoustic
    out = model(batch)
    assert out["pred"].shape == (5,) and torch.isfinite(out["pred"]).all()
    total_loss(out, batch).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # a modality missing from the whole batch
    out = model(drop_modality(batch, "acoustic", list(range(5))))
    assert torch.isfinite(out["pred"]).all() and all(torch.isfinite(v) for v in out["aux"].values())


def test_missing_modality_is_excluded_from_the_gexsent_modality_gate():
    model = make_model("gexsent").eval()
    batch = drop_modality(make_batch(4), "visual", [1, 3])
    weights = model(batch)["extras"]["modality_weights"]  # (B, M) over text, visual, acoustic
    assert torch.all(weights[[1, 3], 1] == 0) and torch.all(weights[[0, 2], 1] > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))


# ----------------------------------------------------------------------------- GAM
def test_a_zero_gate_removes_a_tokens_influence_in_gated_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    gates = torch.rand(2, 6, 1) * 0.9 + 0.1
    gates[:, 2] = 0.0
    changed = x.clone()
    changed[:, 2] = 10 * torch.randn(2, 16)  # a completely different token 2

    attention = GatedSelfAttention(16, n_heads=4, gate_bias=True).eval()
    torch.testing.assert_close(attention(x, mask, gates), attention(changed, mask, gates))

    # the reference's Q/K scaling alone does not silence the token (so the test above can fail)
    reference = GatedSelfAttention(16, n_heads=4, gate_bias=False).eval()
    reference.load_state_dict(attention.state_dict())
    assert not torch.allclose(reference(x, mask, gates), reference(changed, mask, gates))


def test_gates_of_one_are_plain_attention():
    torch.manual_seed(0)
    attention = GatedSelfAttention(16, n_heads=4).eval()
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(attention(x, mask, torch.ones(2, 5, 1)), attention(x, mask))


def test_reference_softmax_mean_gate_is_constant():
    model = make_model("gexsent", variant="reference", n_experts=5).eval()
    gates = model(make_batch(3))["extras"]["token_gates_text"]
    torch.testing.assert_close(gates, torch.full_like(gates, 1 / 5))


# ----------------------------------------------------------------------------- GCE grading and relations
def errors_of(predictions, labels):
    return (predictions - labels).abs()  # per-sample L1, what the pair graders' losses give


def test_batch_grading_picks_the_minimum_error_pair_and_respects_the_ratio():
    labels = torch.tensor([1.0, -1.0, 2.0, 0.0])
    # mean L1 errors: pair 0 -> 0.5, pair 1 -> 1.0, pair 2 -> 0.6
    predictions = torch.stack([labels + 0.5, labels - 1.0, labels + torch.tensor([0.6, -0.6, 0.6, -0.6])])
    valid = torch.ones(3, 4, dtype=torch.bool)
    guides, errors = grade_pairs(errors_of(predictions, labels), valid, ratio=0.7, per_sample=False)
    torch.testing.assert_close(errors[:, 0], torch.tensor([0.5, 1.0, 0.6]))
    assert guides[0, 1].all()  # 0.5 < 0.7 * 1.0: pair 0 guides pair 1
    assert not guides[0, 2].any()  # 0.5 >= 0.7 * 0.6 = 0.42: too close to guide pair 2
    assert guides.sum() == 4  # nothing else: only the best pair guides, never itself

    # with the guide much better than both, it guides both; a looser ratio also lets 0 guide 2
    guides, _ = grade_pairs(errors_of(predictions, labels), valid, ratio=0.9, per_sample=False)
    assert guides[0, 1].all() and guides[0, 2].all() and guides.sum() == 8


def test_sample_grading_picks_each_samples_minimum_error_pair():
    labels = torch.zeros(3)
    errors = torch.tensor([[0.1, 0.9, 0.5],   # pair 0
                           [0.8, 0.1, 0.5],   # pair 1
                           [0.9, 0.8, 0.4]])  # pair 2
    valid = torch.ones(3, 3, dtype=torch.bool)
    guides, _ = grade_pairs(errors_of(errors, labels), valid, ratio=0.7, per_sample=True)
    assert guides[0, 1, 0] and guides[0, 2, 0]  # sample 0: pair 0 guides both
    assert guides[1, 0, 1] and guides[1, 2, 1]  # sample 1: pair 1 guides both
    assert not guides[:, :, 2].any()  # sample 2: best is 0.4, not < 0.7 * 0.5
    assert guides.sum() == 4

    valid[0, 0] = False  # pair 0 cannot be graded on sample 0 (a modality is missing)
    guides, _ = grade_pairs(errors_of(errors, labels), valid, ratio=0.7, per_sample=True)
    assert not guides[0, :, 0].any() and not guides[:, 0, 0].any()


def test_relation_weights_lie_in_unit_interval_and_loss_vanishes_for_matching_grams():
    torch.manual_seed(0)
    relation = RelationFilter(dim=8, relation_dim=4, alpha=0.125)
    guide, student = torch.randn(6, 8), torch.randn(6, 8)
    weights = relation.weights(guide, student)
    assert weights.shape == (6,) and ((weights > 0) & (weights < 1)).all()

    rows = cols = torch.ones(6)
    assert relation_loss(guide, student, weights, rows, cols) > 0
    # a rescaled guide has the same cosine Gram matrix: nothing to transfer
    torch.testing.assert_close(gram(3 * guide), gram(guide))
    assert relation_loss(guide, 3 * guide, weights, rows, cols).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_loss(guide, student, weights, torch.zeros(6), cols) == 0  # no rows taught, no loss


def test_relation_loss_is_the_weighted_gram_difference_over_the_batch():
    torch.manual_seed(0)
    relation = RelationFilter(dim=8, relation_dim=4, alpha=0.125)
    guide, student = torch.randn(5, 8), torch.randn(5, 8, requires_grad=True)
    weights = relation.weights(guide, student)
    expected = ((gram(student) - gram(guide)) ** 2 * weights[:, None]).sum() / 5
    loss = relation_loss(guide.requires_grad_(), student, weights, torch.ones(5), torch.ones(5))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert guide.grad is None and student.grad.abs().sum() > 0  # the guide is detached


def test_gce_graders_send_no_gradient_into_the_encoders():
    model = make_model("gce").train()
    batch = make_batch(6)
    out = model(batch)
    out["aux"]["graders"].backward()
    graders = [*model.unimodal_graders.values(), *model.pair_graders.values()]
    assert all(sum(p.grad.abs().sum() for p in grader.parameters()) > 0 for grader in graders)
    upstream = [*model.encoders.parameters(), *model.pair_fusion.parameters(), *model.missing.parameters()]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in upstream)

    # whereas the task loss does reach them, so the check above can fail
    model.zero_grad()
    task_loss(model(batch)["pred"], batch["label"], "regression").backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())


def test_gce_relation_loss_appears_only_with_a_guide():
    model = make_model("gce").train()
    out = model(make_batch(8))
    assert set(out["aux"]) == {"contrastive", "graders", "relation", "relation_filter"}
    guides = out["extras"]["guides"]
    assert (out["aux"]["relation"] > 0) == bool(guides.any())
    model.config.grading_ratio = 0.0  # nobody is ever good enough to guide
    assert model(make_batch(8))["aux"]["relation"] == 0


def test_contrastive_loss_is_lower_for_aligned_pairs_than_shuffled_ones():
    torch.manual_seed(0)
    a = torch.randn(16, 8)
    b = a + 0.1 * torch.randn(16, 8)
    shuffled = b[torch.roll(torch.arange(16), 1)]
    scale = 1 / 0.07
    assert info_nce(a, b, scale) < 0.5 * info_nce(a, shuffled, scale)
    assert info_nce(a[:1], b[:1], scale) == 0  # one sample: nothing to contrast


@pytest.mark.parametrize("dims,keys", [
    ({"text": 12, "visual": 10}, {"contrastive", "graders"}),
    ({"visual": 10}, {"graders"}),
])
def test_gce_with_fewer_modalities(dims, keys):
    model = make_model("gce", dims=dims).train()
    batch = make_batch(4, dims)
    out = model(batch)
    assert set(out["aux"]) == keys and out["pred"].shape == (4,)
    assert model.relation_filters is None
    if len(dims) == 1:  # the unimodal path: utterance vector -> summary -> head
        assert len(model.pair_fusion) == 0
        model.eval()
        utterance = model.encoders["visual"](batch["visual"], batch["visual_mask"])
        expected = model.head(model.unimodal_summary(utterance))[:, 0]
        torch.testing.assert_close(model(batch)["pred"], expected)


# ----------------------------------------------------------------------------- interface
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_batch_size_one(name):
    model = make_model(name)
    batch = make_batch(1)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        out = model(batch)
        assert out["pred"].shape == (1,) and torch.isfinite(out["pred"]).all()
    model.train()
    total_loss(model(batch), batch).backward()
    # sequences of length 1 (a single image frame) too
    single = {**batch, "visual": batch["visual"][:, :1], "visual_mask": torch.ones(1, 1, dtype=torch.bool)}
    assert model(single)["pred"].shape == (1,)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_classification_gives_logits(name):
    model = make_model(name, task="classification", num_classes=3).train()
    batch = make_batch(4, task="classification", num_classes=3)
    out = model(batch)
    assert out["pred"].shape == (4, 3)
    total_loss(out, batch, "classification").backward()


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_bfloat16_autocast(name):
    model = make_model(name).train()
    batch = make_batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss = total_loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_config_errors_are_clear():
    with pytest.raises(ParamError, match=r"^gexsent\.d_modle: unknown param"):
        build_model("gexsent", DIMS, "regression", 1, {"d_modle": 32})
    with pytest.raises(ParamError, match=r"^gexsent\.routing: 'magic' is not allowed \(dispatch \| einsum\)"):
        build_model("gexsent", DIMS, "regression", 1, {"routing": "magic"})
    with pytest.raises(ValueError, match="needs a text modality"):
        build_model("text_only", {"visual": 10}, "regression", 1, {})
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gpt", DIMS, "regression", 1, {})
    with pytest.raises(ValueError, match="modality"):
        build_model("gce", {"audio": 4}, "regression", 1, {})


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_overfits_a_small_fixed_batch(name):
    model = make_model(name).train()
    batch = make_batch(16, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        out = model(batch)
        loss = task_loss(out["pred"], batch["label"], "regression")
        optimizer.zero_grad()
        (loss + sum(out["aux"].values())).backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < 0.1 * losses[0], (losses[0], losses[-10:])


# ----------------------------------------------------------------------------- docs and sizes
@pytest.mark.parametrize("module", [pipeline.models.gexsent, pipeline.models.gce, pipeline.models.baselines])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_parameter_counts_at_default_sizes(capsys):
    dims = {"text": 384, "visual": 1280, "acoustic": 45}
    counts = {}
    for name, subset in itertools.product(ALL_MODELS, [dims, {"text": 384}]):
        counts[name, len(subset)] = sum(p.numel() for p in build_model(name, subset, "regression", 1, {}).parameters())
    with capsys.disabled():
        print("\nparameters at default sizes (text 384, visual 1280, acoustic 45 | text only):")
        for name in ALL_MODELS:
            print(f"  {name:12s} {counts[name, 3]:>10,d} | {counts[name, 1]:>10,d}")
    assert counts["text_only", 3] == counts["text_only", 1]  # ignores the other modalities
    assert all(counts[name, 3] > counts[name, 1] for name in ("gexsent", "gce", "late_fusion"))


# ----------------------------------------------------------------------------- variants: the reference as published
def test_reference_contrastive_scaling_is_the_published_one():
    """GCE's Clip: a projected then normalised, b normalised then projected (not renormalised), logits x log(1/T)."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 4)
    ours = ContrastiveAlignment(5, 4, 3, 0.07, learnable_temperature=False)
    reference = ContrastiveAlignment(5, 4, 3, 0.07, learnable_temperature=False, reference=True)
    reference.load_state_dict(ours.state_dict())
    every = torch.ones(6, dtype=torch.bool)
    pa, pb = F.normalize(ours.proj_a(a), dim=-1), ours.proj_b(F.normalize(b, dim=-1))
    torch.testing.assert_close(reference(a, b, every), symmetric_cross_entropy(math.log(1 / 0.07) * pa @ pb.t()))
    both = F.normalize(ours.proj_b(b), dim=-1)
    torch.testing.assert_close(ours(a, b, every), symmetric_cross_entropy(pa @ both.t() / 0.07))


def test_gce_variants_build_their_components():
    reference, improved = make_model("gce:reference", encoder_ff_dim=0), make_model("gce", encoder_ff_dim=0)
    assert isinstance(reference.head, pipeline.models.gce.ReferenceHead) and isinstance(improved.head, MLPHead)
    assert reference.config.pool() == "first" and improved.config.pool() == "mean"
    assert reference.config.ff_dim("visual") == 2048 and improved.config.ff_dim("visual") == 4 * 8
    assert reference.contrastive["text_visual"].reference and not improved.contrastive["text_visual"].reference
    assert reference.relation_filters[0].alpha == 0.125 and improved.relation_filters[0].alpha == 1.0
    assert len(set(map(id, reference.relation_filters))) == 1 and len(set(map(id, improved.relation_filters))) == 6
    with pytest.raises(ParamError, match=r"^gce\.learnable_temperature: true is not allowed \(false with variant reference"):
        build_model("gce", DIMS, "regression", 1, {"variant": "reference", "learnable_temperature": True})
    with pytest.raises(ParamError, match=r"^gexsent\.head_hidden: 16 is not allowed \(64 with variant reference"):
        build_model("gexsent", DIMS, "regression", 1, {"variant": "reference", "head_hidden": 16})


def test_reference_relation_filter_learns_from_the_relation_loss_and_ours_from_the_graders():
    batch = make_batch(8)
    for name, filter_gets_relation_gradient in (("gce:reference", True), ("gce", False)):
        model = make_model(name, grading_ratio=10.0).train()  # every pair qualifies: the relation loss fires
        out = model(batch)
        model.zero_grad()
        out["aux"]["relation"].backward(retain_graph=True)
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.relation_filters.parameters())
        assert got == filter_gets_relation_gradient, name
        if "relation_filter" in out["aux"]:  # ours: trained by its own loss, on detached inputs
            model.zero_grad()
            out["aux"]["relation_filter"].backward()
            assert all(p.grad.abs().sum() > 0 for p in model.relation_filters.parameters())
            assert all(p.grad is None for p in model.pair_fusion.parameters())


def test_improved_relation_filter_learns_where_the_guide_is_better():
    """Trained on its own loss, w separates samples where the guide pair's grader beats the student's."""
    torch.manual_seed(0)
    model = make_model("gce", grading_ratio=0.7).train()
    optimizer = torch.optim.Adam(model.relation_filters.parameters(), lr=0.05)
    reprs = {n: torch.randn(64, 8) for n in model.pair_names}
    errors = torch.stack([(reprs[n][:, 0] > 0).float() for n in model.pair_names])  # pair p errs where dim 0 > 0
    valid = torch.ones(3, 64, dtype=torch.bool)
    for _ in range(200):
        _, loss = model.relation_weights(reprs, valid, errors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights, _ = model.relation_weights(reprs, valid, errors)
    g, s = model.ordered_pairs[0]
    better = (errors[g] < 0.7 * errors[s])  # the guide is right and the student wrong
    assert weights[0][better].mean() - weights[0][~better].mean() > 0.5, (weights[0][better], weights[0][~better])


def test_reference_gexsent_linear_experts_use_raw_top2_probabilities():
    torch.manual_seed(0)
    experts = pipeline.models.gexsent.LinearExperts(in_dim=6, out_dim=4, n_experts=5, top_k=2)
    x, mask = torch.randn(2, 3, 6), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out, stats, _ = experts(x, mask)
    tokens = x[mask]
    probs = experts.router(tokens).softmax(-1)
    top, chosen = probs.topk(2, dim=-1)
    each = experts.experts(tokens).reshape(len(tokens), 5, 4)
    expected = (top[..., None] * each[torch.arange(len(tokens))[:, None], chosen]).sum(1)  # not renormalised
    torch.testing.assert_close(out[mask], expected)
    assert out[~mask].abs().sum() == 0 and stats.routed.sum() == 2 * mask.sum()
    model = make_model("gexsent:reference")
    assert set(model(make_batch(3))["aux"]) == set()  # no balance loss in the reference


def test_reference_gexsent_weighs_modalities_by_token_count():
    model = make_model("gexsent:reference", reference_acoustic=True).eval()
    batch = make_batch(4)
    counts = torch.stack([batch[f"{m}_mask"].sum(-1) for m in DIMS], -1).float()
    torch.testing.assert_close(model(batch)["extras"]["modality_weights"], counts / counts.sum(-1, keepdim=True))


def test_reference_gexsent_is_the_published_model_at_its_published_size():
    """model.py's MOEModel on text + frames: widths 512, 8 heads, LSTM 35 -> 128 -> 768, experts 768 -> 512,
    a 3-class linear head; its parameter count recomputed from those shapes, layer by layer."""
    dims = {"text": 768, "visual": 35, "acoustic": 74}  # ModernBERT-base states, FACET frames; audio it never reads
    model = build_model("gexsent", dims, "classification", 3, {"variant": "reference"})
    assert model.modalities == ("text", "visual")  # no acoustic stream
    lstm = 4 * 128 * (35 + 128 + 2) + 4 * 128 * (128 + 128 + 2) + (128 * 768 + 768)  # 2 layers, then Linear 128 -> 768
    experts = lambda d_in: (d_in * 10 + 10) + 10 * (d_in * 512 + 512)  # router + 10 linear experts d_in -> 512
    attention = 4 * (512 * 512 + 512)  # nn.MultiheadAttention(512, 8): in_proj (3 maps) + out_proj
    gates = 2 * (2 * 512 + 512 * 10 + 10)  # per stream: LayerNorm + Linear(512, 10)
    gated = 3 * (512 * 512 + 512)  # ModifiedAttentionBlock: Q, K, V, no output projection
    published = lstm + experts(768) + experts(768) + attention + gates + gated + (512 * 3 + 3)
    assert sum(p.numel() for p in model.parameters()) == published
    assert model.self_attention.n_heads == 8 and model.encoders["visual"].lstm.hidden_size == 128
    with_audio = build_model("gexsent", dims, "classification", 3, {"variant": "reference", "reference_acoustic": True})
    assert with_audio.modalities == ("text", "visual", "acoustic") and "acoustic" in with_audio.encoders
    assert pipeline.models.modalities_read("gexsent", ["text", "visual", "acoustic"], {"variant": "reference"}) == [
        "text", "visual"]
    assert pipeline.models.modalities_read("gexsent", ["text", "visual", "acoustic"], {}) == ["text", "visual", "acoustic"]
    with pytest.raises(ParamError, match=r"^gexsent\.reference_acoustic: true is not allowed \(false with variant improved"):
        build_model("gexsent", DIMS, "regression", 1, {"reference_acoustic": True})


# ----------------------------------------------------------------------------- ablation switches
def shared_weights(full, ablated):
    """Copy the full model's weights into the ablated one (which lacks the ablated parameters)."""
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not missing, missing
    return unexpected


def test_gce_ablate_contrastive_removes_only_the_infonce_loss():
    full, ablated = make_model("gce").train(), make_model("gce", ablate=["contrastive"]).train()
    assert all(k.startswith("contrastive.") for k in shared_weights(full, ablated))
    batch = make_batch(6)
    out_full, out = full(batch), ablated(batch)
    assert "contrastive" in out_full["aux"] and "contrastive" not in out["aux"]
    torch.testing.assert_close(out["pred"], out_full["pred"])
    torch.testing.assert_close(out["aux"]["graders"], out_full["aux"]["graders"])


def test_gce_ablate_relation_removes_the_relation_loss_and_filter():
    model = make_model("gce", ablate=["relation"]).train()
    out = model(make_batch(6))
    assert model.relation_filters is None and set(out["aux"]) == {"contrastive", "graders"}


def test_gce_ablate_grading_lets_every_pair_teach_every_other():
    batch = drop_modality(make_batch(6), "visual", [0])
    model = make_model("gce", ablate=["grading"]).train()
    model.config.grading_ratio = 0.0  # grading would let nobody guide
    guides = model(batch)["extras"]["guides"]  # (P, P, B)
    valid = torch.stack([batch[f"{a}_mask"].any(-1) & batch[f"{b}_mask"].any(-1) for a, b in model.pairs])
    expected = valid[:, None] & valid[None, :] & ~torch.eye(3, dtype=torch.bool)[..., None]
    assert torch.equal(guides, expected) and guides.any()
    graded = make_model("gce").train()
    graded.config.grading_ratio = 0.0
    assert not graded(batch)["extras"]["guides"].any()


def test_gce_ablate_graders_removes_the_graders_and_runs_the_transfer_ungraded_and_unweighted():
    model = make_model("gce", ablate=["graders"]).train()
    out = model(make_batch(6))
    assert len(model.unimodal_graders) == len(model.pair_graders) == 0 and model.relation_filters is None
    assert "graders" not in out["aux"] and out["aux"]["relation"] > 0
    assert torch.equal(out["extras"]["relation_weights"], torch.ones_like(out["extras"]["relation_weights"]))
    reference = make_model("gce:reference", ablate=["graders"]).train()  # its filter needs no graders
    assert reference.relation_filters is not None and "relation" in reference(make_batch(6))["aux"]


def test_gexsent_ablate_experts_uses_a_dense_ffn_as_wide_as_the_routed_experts():
    model = make_model("gexsent", ablate=["experts"]).train()
    ffn = model.experts["text"]
    assert isinstance(ffn, torch.nn.Sequential) and ffn[0].out_features == 2 * 16  # top_k x expert_hidden
    out = model(make_batch(4))
    assert "balance" not in out["aux"] and not any(isinstance(m, MixtureOfExperts) for m in model.modules())
    assert not any(k.startswith("expert_weight_") for k in out["extras"])


def test_gexsent_ablate_modality_gate_weighs_present_modalities_equally():
    full, ablated = make_model("gexsent").eval(), make_model("gexsent", ablate=["modality_gate"]).eval()
    shared_weights(full, ablated)
    batch = drop_modality(make_batch(4), "visual", [1])
    weights = ablated(batch)["extras"]["modality_weights"]
    torch.testing.assert_close(weights[0], torch.full((3,), 1 / 3))
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.0, 0.5]))
    for gate in full.modality_gate.values():  # a gate with zero logits is the ablated computation
        torch.nn.init.zeros_(gate.weight), torch.nn.init.zeros_(gate.bias)
    torch.testing.assert_close(ablated(batch)["pred"], full(batch)["pred"])


def test_gexsent_ablate_gated_attention_pools_the_self_attention_output():
    full, ablated = make_model("gexsent").eval(), make_model("gexsent", ablate=["gated_attention"]).eval()
    unexpected = shared_weights(full, ablated)
    assert unexpected and all(k.startswith(("cross_gates.", "gated_attention.")) for k in unexpected)
    for m in full.modalities:  # the full model with gated attention bypassed computes the same
        full.gated_attention[m].forward = lambda x, mask, gates: x
    batch = make_batch(4)
    out = ablated(batch)
    torch.testing.assert_close(out["pred"], full(batch)["pred"])
    assert not any(k.startswith("token_gates_") for k in out["extras"])
    reference = make_model("gexsent:reference", ablate=["gated_attention"])
    assert reference.gated_attention is None and len(reference.cross_gates) == 0
