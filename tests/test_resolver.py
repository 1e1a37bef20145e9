"""The resolver: on bundles of the session's own model of TinyStories-656K's shapes (gguf for
llama.cpp, onnx for ONNX Runtime; they need no ../shared), its memory figures against the
model, its choices against the bundle's measurements for many random profiles, and the
`resolve` command as users run it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.cli.commands import app
from coalora_edge.errors import BudgetError, ProfileError, SchemeError
from coalora_edge.model.dims import ModelDims
from coalora_edge.model.evaluate import lm_score
from coalora_edge.model.loading import load_model
from coalora_edge.profiles import load_profile, validate_profile
from coalora_edge.resolve.candidates import NEAR_BITS, Candidates, measured_front, predict_loss
from coalora_edge.resolve.memory import estimate_memory, sidecar_bytes
from coalora_edge.resolve.non_adapted import base_bytes
from coalora_edge.resolve.resolver import Resolver, predicted_decode_ratio
from coalora_edge.runtimes import for_scheme
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.gguf import DECODE_COST
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.search.knapsack import best_config
from coalora_edge.search.problem import Problem
from coalora_edge.search.speed import fast_config
from coalora_edge.training.data import load_blocks
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only

SETTINGS = TrainSettings(steps=4, batch_size=4, rank=4, alpha=8, lr=1e-2)
#: stored formats of the gguf choices on TinyStories-656K's shapes (128- and 384-wide rows: K-quants fall back)
GGUF_STORED = ["Q4_0", "Q5_0", "Q5_1", "Q8_0"]


def train(model, text, out, scheme, budgets, choices=None):
    return load_bundle(train_bundle(TrainJob(model=str(model), data=[str(text)], out=out, scheme=scheme,
                                    choices=choices, seq_len=32, budgets=budgets, eval_blocks=8, show_progress=False,
                                    settings=SETTINGS)).path)


@pytest.fixture(scope="module")
def gguf_bundle(own_model, own_text, tmp_path_factory):
    return train(own_model, own_text, tmp_path_factory.mktemp("resolve") / "gguf", "gguf", [4.5, 5.0, 5.5, 8.5])


@pytest.fixture(scope="module")
def onnx_bundle(own_model, own_text, tmp_path_factory):
    # four formats keep the exact ORT quantization (sensitivity, training) quick
    return train(own_model, own_text, tmp_path_factory.mktemp("resolve") / "onnx", "onnx", [3.0, 6.0],
                 ["int2_b128_asym", "int4_b128_asym", "int4_b32_asym", "int8_b32_asym"])


@pytest.fixture(scope="module")
def ts_gguf_bundle(tinystories_dir, tinystories_text, tmp_path_factory):
    """TinyStories-656K's: for the test whose premise is a quality figure (more bits, lower loss)."""
    return train(tinystories_dir, tinystories_text, tmp_path_factory.mktemp("resolve") / "ts-gguf", "gguf",
                 [4.5, 5.0, 5.5, 8.5])


def per_config_copy(bundle, folder):
    # A per-config bundle differs in its adapter file, which resolving never opens, and in
    # the manifest's method, which decides whether new configurations may be built.
    path = shutil.copytree(bundle.path, folder / "per-config")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["adapter"].update(method="per-config", adapter_method="shared")
    (path / "manifest.json").write_text(json.dumps(manifest))
    return load_bundle(path)


@pytest.fixture(scope="module")
def per_config_bundle(gguf_bundle, tmp_path_factory):
    return per_config_copy(gguf_bundle, tmp_path_factory.mktemp("resolve"))


@pytest.fixture(scope="module")
def resolvers(gguf_bundle, onnx_bundle, per_config_bundle):
    return {name: Resolver.from_bundle(b) for name, b in
            [("gguf", gguf_bundle), ("onnx", onnx_bundle), ("per-config", per_config_bundle)]}


def with_budget(profile, resolver, budget: int):
    """``profile`` with memory moved so that exactly ``budget`` bytes are left for the weights."""
    memory = profile.memory_bytes + budget - resolver.breakdown(profile).headroom
    return validate_profile({**profile.model_dump(), "memory_bytes": memory}, "test")


def measured(bundle, profile=None):
    """(config, bytes, loss) of every measured configuration, from the bundle's own files;
    with ``profile``, only those predicted fast enough for it (:func:`decode_ratio`)."""
    shapes = {m.name: m.shape for m in bundle.matrices}
    scheme = get_scheme(bundle.scheme)
    configs = bundle.configs()
    every = [(configs[e["config"]], config_nbytes(scheme, shapes, configs[e["config"]]), e["loss"])
             for e in bundle.read_json("pareto.json")["evaluations"]]
    return [row for row in every if profile is None or decode_ratio(bundle, row[0], profile) >= profile.min_decode_ratio]


def ratio_oracle(numel, nbytes, stored, allows, cost, picks):
    """The speed floor's arithmetic written out (search/speed.py): weights x cost of the stored
    format, against the allowed uniform configurations (the faster of equal sizes), linear
    in bytes between them; inf where there is none to compare with (no floor)."""
    rows = range(len(numel))
    time = lambda p: sum(numel[i] * cost[stored[i][p[i]]] for i in rows)  # noqa: E731
    uniform = {}
    for j in range(len(nbytes[0])):
        if all(allows(stored[i][j]) for i in rows):
            n = sum(nbytes[i][j] for i in rows)
            uniform[n] = min(time([j] * len(numel)), uniform.get(n, np.inf))
    if not uniform:
        return np.inf
    sizes = sorted(uniform)
    return np.interp(sum(nbytes[i][picks[i]] for i in rows), sizes, [uniform[n] for n in sizes]) / time(picks)


def decode_ratio(bundle, config, profile):
    """``ratio_oracle`` from the bundle's files, gguf's measured costs and the profile's formats."""
    if bundle.scheme != "gguf":
        return np.inf
    scheme = get_scheme("gguf")
    shapes = [m.shape for m in bundle.matrices]
    stored = [[scheme.storage(c, shape) for c in bundle.choices] for shape in shapes]
    return ratio_oracle([a * b for a, b in shapes], [[f.nbytes(shape) for f in row] for row, shape in zip(stored, shapes)],
                        [[f.name for f in row] for row in stored], profile.allows, DECODE_COST,
                        [bundle.choices.index(config[m.name]) for m in bundle.matrices])


# -- memory figures -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, profile", [("gguf", "tiny-demo-llamacpp"), ("onnx", "tiny-demo-onnx")])
def test_shipped_demo_profiles_get_the_best_fitting_measured_configuration(request, own_model, scheme, profile):
    bundle = request.getfixturevalue(f"{scheme}_bundle")
    p = load_profile(profile)
    r = Resolver.from_bundle(bundle).resolve(p)
    # the breakdown, rebuilt from the model with its weights (the resolver only read its config)
    model = load_model(str(own_model))
    shapes = {m.name: m.shape for m in bundle.matrices}
    expected = estimate_memory(p, ModelDims.from_config(model.config), weights_bytes=config_nbytes(get_scheme(scheme), shapes, r.config),
                               non_adapted_bytes=base_bytes(model, shapes, p.runtime))
    assert r.memory == expected and r.memory.fits and r.headroom == p.memory_bytes - r.memory.total >= 0
    assert r.nbytes == r.memory.weights and r.bits_per_weight == 8 * r.nbytes / sum(a * b for a, b in shapes.values())
    fitting = [(c, n, loss) for c, n, loss in measured(bundle, p) if n <= r.weights_budget]
    assert (r.source, r.loss) == ("measured", min(loss for _, _, loss in fitting))
    assert r.config in [c for c, _, _ in fitting] and r.perplexity == pytest.approx(math.exp(r.loss))


def test_sidecar_mode_counts_the_lora_factors(resolvers, gguf_bundle):
    merged = load_profile("tiny-demo-llamacpp")
    sidecar = validate_profile({**merged.model_dump(), "adapter_mode": "sidecar"}, "test")
    r = resolvers["gguf"]
    lora = sidecar_bytes([m.shape for m in gguf_bundle.matrices], gguf_bundle.manifest.adapter.rank)
    assert lora == 4 * 4 * sum(a + b for a, b in (m.shape for m in gguf_bundle.matrices))
    assert r.breakdown(merged).headroom - r.breakdown(sidecar).headroom == lora
    assert r.resolve(sidecar).memory.sidecar == lora


# -- choosing ------------------------------------------------------------------------------------


def test_a_budget_between_measured_configurations_gets_a_new_one_with_its_adapter(ts_gguf_bundle, tinystories_text, tmp_path):
    # On TinyStories: the premise, that 5.5 bits measured better than 5.0, needs real weights
    # (own_model's two losses are equal to 1e-4).
    gguf_bundle = ts_gguf_bundle
    r = Resolver.from_bundle(gguf_bundle)
    problem = r.space.problem
    losses = {n: loss for _, n, loss in measured(gguf_bundle)}
    at_5, at_5_5 = problem.budget_bytes(5.0), problem.budget_bytes(5.5)
    assert losses[at_5_5] < losses[at_5], "the fixture's training no longer improves from 5.0 to 5.5 bits"
    budget = problem.budget_bytes(5.3)  # 0.3 bits above the best known one that fits: not near
    unchecked = validate_profile({**load_profile("tiny-demo-llamacpp").model_dump(), "min_decode_ratio": 0}, "test")
    resolution = r.resolve(with_budget(unchecked, r, budget))
    solution = best_config(problem, budget)
    assert (resolution.source, resolution.loss_is, resolution.config) == ("new", "interpolated", solution.config)
    assert resolution.nbytes == solution.nbytes <= budget == resolution.weights_budget
    assert resolution.loss == pytest.approx(np.interp(solution.bits_per_weight, [5.0, 5.5], [losses[at_5], losses[at_5_5]]))
    # the configuration model generates its adapter: no retraining, and it runs
    restored = restore(gguf_bundle)
    restored.use(resolution.config)
    blocks = load_blocks(restored.tokenizer, [str(tinystories_text)], 32, 0.1)
    assert math.isfinite(lm_score(restored.wrapper, blocks.valid[:4], 4).loss)
    # per-config bundles have adapters for their measured configurations only
    per_config = Resolver.from_bundle(per_config_copy(gguf_bundle, tmp_path)).resolve(with_budget(unchecked, r, budget))
    assert (per_config.source, per_config.nbytes, per_config.loss) == ("measured", at_5, losses[at_5])


def test_a_budget_near_a_measured_configuration_keeps_it(resolvers, gguf_bundle):
    r = resolvers["gguf"]
    budget = r.space.problem.budget_bytes(5.0 + NEAR_BITS)  # exactly NEAR_BITS unused: near enough
    resolution = r.resolve(with_budget(load_profile("tiny-demo-llamacpp"), r, budget))
    assert (resolution.source, resolution.nbytes) == ("measured", r.space.problem.budget_bytes(5.0))


def test_allowed_formats_restrict_the_stored_formats(resolvers):
    r = resolvers["gguf"]
    profile = validate_profile({**load_profile("tiny-demo-llamacpp").model_dump(), "allowed_formats": ["Q4_0", "Q5_*"]}, "test")
    resolution = r.resolve(profile)
    assert set(resolution.stored.values()) <= {"Q4_0", "Q5_0", "Q5_1"}
    # K-quants need 256-wide rows: none can store matrices of TinyStories' shapes, and the error says so
    only_k = validate_profile({**profile.model_dump(), "allowed_formats": ["Q?_K"]}, "test")
    with pytest.raises(SchemeError, match="no allowed format can store model.layers.0.self_attn.q_proj"):
        r.resolve(only_k)


def test_nothing_fits_names_the_missing_bytes_and_the_context_that_fits(resolvers):
    r = resolvers["gguf"]
    lo = r.space.problem.byte_range(r.space.problem.mask())[0]
    profile = with_budget(load_profile("tiny-demo-llamacpp"), r, lo - 12345)
    with pytest.raises(BudgetError) as e:
        r.resolve(profile)
    message = str(e.value)
    assert "12,345 bytes" in message and "\n" not in message
    context = int(message.split("context_length ")[1].split()[0])
    at = lambda c: r.breakdown(profile.model_copy(update={"context_length": c}), lo).fits  # noqa: E731
    assert at(context) and not at(context + 1) and context < profile.context_length
    hopeless = validate_profile({**profile.model_dump(), "memory_bytes": "1MiB", "reserved_bytes": "768KiB"}, "test")
    with pytest.raises(BudgetError, match="even a 1-token context does not fit: use a smaller model"):
        r.resolve(hopeless)


def test_runtime_must_match_the_bundle_scheme(resolvers):
    with pytest.raises(ProfileError, match="holds gguf formats .* retrain with --scheme onnx"):
        resolvers["gguf"].resolve(load_profile("tiny-demo-onnx"))
    with pytest.raises(ProfileError, match="holds onnx formats .* retrain with --scheme gguf"):
        resolvers["onnx"].resolve(load_profile("tiny-demo-llamacpp"))


def test_an_nf_bundle_cannot_ship(resolvers, gguf_bundle):
    nf = Resolver(bundle=load_bundle(gguf_bundle.path), space=resolvers["gguf"].space, dims=resolvers["gguf"].dims,
                  non_adapted=None, lora=0)
    nf.bundle.manifest.scheme = "nf"
    with pytest.raises(ProfileError, match="no runtime executes; to ship it, retrain with --scheme gguf .* or --scheme onnx"):
        nf.resolve(load_profile("tiny-demo-llamacpp"))


# -- the speed floor (llama.cpp) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def kquant_bundle(tiny_model_dir, own_model, own_text, tmp_path_factory):
    """A Llama whose every matrix holds K-quants (rows of 256 and 768), with own_model's tokenizer."""
    model = shutil.copytree(tiny_model_dir("llama", hidden=256, intermediate=768, vocab=512),
                            tmp_path_factory.mktemp("kquant") / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(own_model / name, model / name)
    return train(model, own_text, tmp_path_factory.mktemp("resolve") / "kquant", "gguf", [4.5])


def sensitivity(problem, config):
    return sum(problem.cost[i, problem.choices.index(config[m])] for i, m in enumerate(problem.matrices))


def test_the_floor_trades_sensitivity_for_decode_speed_at_a_uniform_size(kquant_bundle):
    r = Resolver.from_bundle(kquant_bundle)
    problem = r.space.problem
    q4_k = int(problem.nbytes[:, problem.choices.index("Q4_K")].sum())  # the uniform Q4_K file's weights
    profile = with_budget(load_profile("tiny-demo-llamacpp"), r, q4_k)
    free = r.resolve(profile.model_copy(update={"min_decode_ratio": 0.0}))
    assert free.decode_ratio < 0.95, "the knapsack's own choice at Q4_K's size is fast: the floor is not exercised"
    fast = r.resolve(profile)  # llama.cpp's default floor
    assert profile.min_decode_ratio == 0.95 and fast.decode_ratio >= 0.95 and fast.source == "new"
    assert fast.nbytes <= q4_k and fast.memory.fits
    assert fast.decode_ratio == pytest.approx(decode_ratio(kquant_bundle, fast.config, profile))
    assert sensitivity(problem, fast.config) >= sensitivity(problem, free.config)  # speed costs sensitivity
    # `export` writes the same prediction into export.json
    assert predicted_decode_ratio(kquant_bundle, fast.config, profile) == pytest.approx(fast.decode_ratio)
    assert predicted_decode_ratio(kquant_bundle, free.config, profile) == pytest.approx(free.decode_ratio)


@pytest.mark.parametrize("floor", [0.9, 0.95, 1.0])
def test_every_budget_gets_a_fast_enough_configuration(kquant_bundle, floor):
    r = Resolver.from_bundle(kquant_bundle)
    problem = r.space.problem
    lo, hi = problem.byte_range(problem.mask())
    for budget in np.linspace(lo, hi, 13).astype(int):
        profile = with_budget(load_profile("tiny-demo-llamacpp").model_copy(update={"min_decode_ratio": floor}), r, int(budget))
        res = r.resolve(profile)
        assert res.nbytes <= budget and res.decode_ratio >= floor
        assert res.decode_ratio == pytest.approx(decode_ratio(kquant_bundle, res.config, profile))


def test_no_fast_enough_configuration_is_a_one_line_error(kquant_bundle, tmp_path):
    per_config = load_bundle(shutil.copytree(kquant_bundle.path, tmp_path / "per-config"))
    per_config.manifest.adapter = per_config.manifest.adapter.model_copy(update={"method": "per-config", "adapter_method": "shared"})  # only measured ones ship
    r = Resolver.from_bundle(per_config)
    profile = with_budget(load_profile("tiny-demo-llamacpp"), r, int(r.space.nbytes.max()))
    ratios = [decode_ratio(per_config, c, profile) for c, _, _ in measured(per_config)]
    assert max(ratios) < 0.95, "a measured configuration is fast enough: the error is not exercised"
    with pytest.raises(BudgetError) as e:
        r.resolve(profile)
    best = r.resolve(profile.model_copy(update={"min_decode_ratio": 0.0}))
    assert str(e.value) == (
        f"no configuration that fits profile tiny-demo-llamacpp is predicted to decode at 0.95x the speed of a "
        f"uniform-format one of its size (the best that fits: {best.decode_ratio:.2f}x); "
        "lower min_decode_ratio in the profile (0 turns the check off) or allow more formats")


# -- properties: random profiles on the trained bundles ----------------------------------------------


@st.composite
def profiles(draw, runtime: str):
    kv = {"llama.cpp": ["f16", "f32", "bf16"], "onnxruntime": ["f32", "f16"]}[runtime]  # q8_0: head_dim 16 is no block
    memory = draw(st.integers(9 * 2**20, 24 * 2**20))
    stored = GGUF_STORED if runtime == "llama.cpp" else ["int2_b128_asym", "int4_b128_asym", "int4_b32_asym", "int8_b32_asym"]
    allowed = draw(st.none() | st.lists(st.sampled_from(stored), min_size=1, unique=True))
    floor = {"min_decode_ratio": draw(st.sampled_from([0, 0.9, 0.95, 1]))} if runtime == "llama.cpp" else {}
    return validate_profile({**floor,
        "name": "random", "runtime": runtime, "memory_bytes": memory,
        "reserved_bytes": draw(st.integers(0, 2 * 2**20)), "context_length": draw(st.integers(16, 320)),
        "kv_cache_dtype": draw(st.sampled_from(kv)), "batch": draw(st.integers(1, 2)),
        "adapter_mode": draw(st.sampled_from(["merged", "sidecar"])), "allowed_formats": allowed,
    }, "random")


def check_choice(resolver, bundle, profile):
    """The chosen configuration fits, uses allowed formats, is predicted fast enough, and no
    measured one that does all three is better; if nothing is chosen, nothing measured does."""
    scheme = get_scheme(bundle.scheme)
    shapes = {m.name: m.shape for m in bundle.matrices}
    budget = resolver.breakdown(profile).headroom
    stored = lambda c: {scheme.storage(f, shapes[m]).name for m, f in c.items()}  # noqa: E731
    candidates = [loss for c, n, loss in measured(bundle, profile) if n <= budget and all(map(profile.allows, stored(c)))]
    try:
        r = resolver.resolve(profile)
    except (BudgetError, ProfileError):  # nothing fits / per-config: nothing measured is allowed
        assert not candidates
        return
    assert r.memory.fits and r.memory.total <= profile.memory_bytes and r.nbytes <= budget
    assert r.memory == resolver.breakdown(profile, config_nbytes(scheme, shapes, r.config))
    assert all(map(profile.allows, r.stored.values())) and set(r.stored.values()) == stored(r.config)
    ratio = decode_ratio(bundle, r.config, profile)
    assert ratio >= profile.min_decode_ratio
    assert r.decode_ratio == (None if ratio == np.inf else pytest.approx(ratio))
    if r.source == "measured":
        assert r.loss == min(candidates)
    else:
        assert not candidates or r.loss < min(candidates)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_profiles_get_a_fitting_configuration_no_measured_one_beats(resolvers, data):
    name = data.draw(st.sampled_from(sorted(resolvers)))
    resolver = resolvers[name]
    check_choice(resolver, resolver.bundle, data.draw(profiles(for_scheme(resolver.bundle.scheme).name)))


# -- properties: the choice alone, on synthetic configuration spaces ------------------------------


@st.composite
def spaces(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m, c, k = draw(st.integers(1, 6)), draw(st.integers(2, 4)), draw(st.integers(1, 8))
    numel = rng.integers(1, 20, m) * 256
    bits = np.sort(rng.uniform(2, 9, c))
    problem = Problem(matrices=tuple(f"m{i}" for i in range(m)), choices=tuple(f"c{j}" for j in range(c)),
                      nbytes=(numel[:, None] * bits / 8).astype(np.int64) + rng.integers(0, 50, (m, c)),
                      cost=numel[:, None] * np.exp(-bits) * rng.uniform(0.5, 1.5, (m, c)), numel=numel)
    space = Candidates(problem, picks=rng.integers(0, c, (k, m)), loss=rng.uniform(1, 3, k), on_the_fly=draw(st.booleans()))
    allowed = draw(st.none() | st.lists(st.sampled_from(problem.choices), min_size=1, unique=True))
    lo, hi = problem.byte_range(problem.mask())
    return space, allowed, draw(st.integers(lo - 100, hi + 100))


@settings(max_examples=400, deadline=None)
@given(spaces())
def test_the_choice_fits_and_no_fitting_measured_configuration_is_better(case):
    space, allowed, budget = case
    problem = space.problem
    rows = np.arange(len(problem.matrices))
    usable = np.isin(np.array(problem.choices)[space.picks], allowed or problem.choices).all(axis=1)
    fitting = usable & (space.nbytes <= budget)
    best_measured = space.loss[fitting].min() if fitting.any() else np.inf
    choice = space.choose(budget, allowed)
    buildable = space.on_the_fly and budget >= problem.byte_range(problem.mask(allowed))[0]
    if choice is None:
        assert not fitting.any() and not buildable
        return
    assert choice.nbytes == problem.nbytes[rows, choice.picks].sum() <= budget
    assert set(np.array(problem.choices)[choice.picks]) <= set(allowed or problem.choices)
    if choice.source == "measured":
        assert choice.loss == best_measured
    else:
        assert space.on_the_fly and choice.loss < best_measured
        assert {m: problem.choices[c] for m, c in zip(problem.matrices, choice.picks)} == best_config(problem, budget, allowed).config


@st.composite
def priced_spaces(draw):
    """``spaces()`` whose choices have random decode costs."""
    space, allowed, budget = draw(spaces())
    cost = {c: draw(st.floats(0.3, 3.0)) for c in space.problem.choices}
    return Candidates(space.problem, picks=space.picks, loss=space.loss, on_the_fly=space.on_the_fly,
                       decode_cost=cost), allowed, budget


@settings(max_examples=300, deadline=None)
@given(priced_spaces(), st.sampled_from([0.8, 0.95, 1.0]))
def test_with_a_floor_the_choice_is_fast_enough_and_no_fast_measured_one_is_better(case, floor):
    space, allowed, budget = case
    problem, cost = space.problem, space.decode_cost
    stored = [list(problem.choices)] * len(problem.matrices)
    allows = lambda f: f in (allowed or problem.choices)  # noqa: E731
    ratio = lambda picks: ratio_oracle(problem.numel, problem.nbytes, stored, allows, cost, picks)  # noqa: E731
    usable = np.isin(np.array(problem.choices)[space.picks], allowed or problem.choices).all(axis=1)
    fast = np.array([ratio(p) >= floor for p in space.picks])
    fitting = usable & fast & (space.nbytes <= budget)
    choice = space.choose(budget, allowed, floor)
    if choice is None:
        assert not fitting.any()
        return
    assert choice.nbytes == problem.nbytes[np.arange(len(problem.matrices)), choice.picks].sum() <= budget
    assert ratio(choice.picks) >= floor and choice.decode_ratio == pytest.approx(ratio(choice.picks))
    best_measured = space.loss[fitting].min() if fitting.any() else np.inf
    assert choice.loss == best_measured if choice.source == "measured" else space.on_the_fly and choice.loss < best_measured


@settings(max_examples=200, deadline=None)
@given(priced_spaces())
def test_the_priced_knapsack_is_fast_enough_and_bounded_by_the_free_one(case):
    space, allowed, budget = case
    problem = space.problem
    speed = space.speed(problem.mask(allowed))
    if budget < problem.byte_range(problem.mask(allowed))[0] or speed is None:
        return
    solution = fast_config(problem, budget, allowed, speed, 0.95)
    free = best_config(problem, budget, allowed)
    if solution is None:  # the fastest configuration within the budget is still too slow
        return
    picks = [problem.choices.index(solution.config[m]) for m in problem.matrices]
    assert solution.nbytes <= budget and speed.ratio(np.array(picks), solution.nbytes) >= 0.95
    assert solution.objective >= free.objective - 1e-9 * abs(free.objective) and solution.bound == free.objective


def test_prediction_is_linear_on_the_front_and_never_flattering_off_it():
    bits, loss = measured_front(np.array([4.0, 5.0, 6.0, 8.0, 5.0]), np.array([3.0, 2.5, 2.0, 2.2, 2.8]))
    assert bits.tolist() == [4.0, 5.0, 6.0] and loss.tolist() == [3.0, 2.5, 2.0]  # 8 bits is beaten by 6
    assert predict_loss(bits, loss, 5.5) == (2.25, "interpolated")
    assert predict_loss(bits, loss, 7.0) == (2.0, "extrapolated")  # more bits: no better than measured
    assert predict_loss(bits, loss, 3.0) == (3.5, "extrapolated")  # fewer: worse along the first slope


# -- the command ---------------------------------------------------------------------------------


def test_resolve_command_json_and_tables(resolvers, gguf_bundle):
    expected = resolvers["gguf"].resolve(load_profile("tiny-demo-llamacpp"))
    result = CliRunner().invoke(app, ["resolve", str(gguf_bundle.path), "--profile", "tiny-demo-llamacpp", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["config"] == expected.config and out["stored"] == expected.stored
    assert out["memory"] == expected.memory.as_dict() and out["headroom"] == expected.headroom
    assert (out["source"], out["bits_per_weight"], out["perplexity"]) == ("measured", expected.bits_per_weight, expected.perplexity)
    assert (out["decode_ratio"], out["min_decode_ratio"]) == (expected.decode_ratio, 0.95) and expected.decode_ratio >= 0.95
    table = CliRunner().invoke(app, ["resolve", str(gguf_bundle.path), "--profile", "tiny-demo-llamacpp"], terminal_width=200)
    assert table.exit_code == 0, table.output
    counts = {f: list(expected.stored.values()).count(f) for f in set(expected.stored.values())}
    for fmt, count in counts.items():
        assert f"│ {fmt}" in table.stdout and f"│ {count} " in table.stdout
    assert f"{expected.headroom:,}" in table.stdout and f"{expected.memory.compute:,}" in table.stdout
    assert f"predicted decode speed: {expected.decode_ratio:.2f}x a uniform-format configuration of its size (floor 0.95;" \
        in " ".join(table.stdout.split())  # however the console wraps it


def test_eval_uses_the_resolved_configuration(resolvers, gguf_bundle, own_text):
    expected = resolvers["gguf"].resolve(load_profile("tiny-demo-llamacpp")).config
    result = CliRunner().invoke(app, ["eval", str(gguf_bundle.path), "--data", str(own_text), "--profile",
                                      "tiny-demo-llamacpp", "--seq-len", "32", "--max-blocks", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"] == expected


def test_resolve_command_errors_are_one_line_exit_2(gguf_bundle):
    proc = subprocess.run([sys.executable, "-m", "coalora_edge", "resolve", str(gguf_bundle.path), "--profile", "no-such-device"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "profile no-such-device: is not a shipped profile" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
    mismatch = CliRunner().invoke(app, ["resolve", str(gguf_bundle.path), "--profile", "tiny-demo-onnx"])
    assert mismatch.exit_code == 3 and "retrain with --scheme onnx" in mismatch.stderr
    assert len(mismatch.stderr.strip().splitlines()) == 1 and mismatch.stdout == ""
