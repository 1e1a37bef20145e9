"""Pareto fronts, hypervolume, segmented selection; pareto.json from a real training run
with the search on, and the `pareto` command."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from coalora_edge.bundle.lookup import config_at_bpw
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.errors import CoaloraError
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.search.front import Normalisation, front_mask, hypervolume_2d, segmented_front
from coalora_edge.search.rounds import SearchSettings
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import Trainer, TrainSettings

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only


def test_front_flags_hand_made_points():
    points = np.array([[1, 5], [2, 3], [3, 3], [2, 4], [4, 1], [4, 1], [0.5, 9]])
    # (3,3) and (2,4) lose to (2,3); the two (4,1) tie and both stay
    assert front_mask(points).tolist() == [True, True, False, False, True, True, True]


def test_hypervolume_hand_made_and_against_botorch():
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    reference = np.array([5.0, 6.0])
    # strips (5-1)(6-5) + (5-2)(5-3) + (5-4)(3-1); a dominated point and one past the reference add nothing
    points = np.array([[1, 5], [2, 3], [4, 1], [3, 4], [6, 0.5]])
    assert hypervolume_2d(points, reference) == 12.0
    assert hypervolume_2d(np.array([[5, 1]]), reference) == 0.0  # on the reference: no area
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = rng.uniform(0, 1, (int(rng.integers(1, 30)), 2))
        ref = np.array([1.1, 1.1])
        # botorch maximises: negate
        expected = Hypervolume(-torch.tensor(ref)).compute(-torch.tensor(pts[front_mask(pts)]))
        assert hypervolume_2d(pts, ref) == pytest.approx(expected, rel=1e-12)


def test_normalisation_maps_lo_to_0_and_hi_to_1_and_reports_its_reference():
    norm = Normalisation.covering(np.array([[2.0, 5.0], [4.0, 3.0], [8.0, 2.0]]), lo=(None, 1.0))
    assert norm.lo == (2.0, 1.0) and norm.hi == (8.0, 5.0)
    assert norm.apply(np.array([[2.0, 1.0], [8.0, 5.0]])).tolist() == [[0, 0], [1, 1]]
    assert norm.hypervolume(np.array([[2.0, 1.0]])) == pytest.approx(1.1 * 1.1)  # the ideal point: the whole box
    assert norm.as_dict()["reference_point"] == [1.1, 1.1]


def test_segmented_selection_keeps_each_bins_front():
    points = np.array([
        [0.5, 5.0], [1.0, 3.0], [1.5, 4.0],  # bin 0: (1.5, 4) loses to (1.0, 3)
        [2.5, 2.0], [3.0, 3.5], [3.5, 1.0],  # bin 1: (3.0, 3.5) loses to (2.5, 2)
        [4.0, 0.5],  # the top of the range belongs to the last bin
        [3.9, 2.8],  # beaten by (2.5, 2) in its bin
    ])
    assert segmented_front(points, (0.0, 4.0), 2).tolist() == [0, 1, 3, 5, 6]
    # one segment is the plain front; more segments keep points the global front drops
    assert set(segmented_front(points, (0.0, 4.0), 1)) == set(np.flatnonzero(front_mask(points)))
    assert 4 in segmented_front(points, (0.0, 4.0), 8)  # (3.0, 3.5) alone in its bin
    assert 4 not in np.flatnonzero(front_mask(points))


# -- a real run with the search on -----------------------------------------------------

CHOICES = ["int2_b64_asym", "int4_b64_asym", "int4_b32_asym", "int8_b32_asym"]


def search_job(model, text, out, **changes) -> TrainJob:
    job = TrainJob(model=str(model), data=[str(text)], out=out, scheme="onnx", choices=CHOICES,
                   seq_len=32, budgets=[3.0, 5.0], calib_blocks=4, eval_blocks=4, show_progress=False,
                   settings=TrainSettings(steps=2, batch_size=4, rank=4, alpha=8, lr=1e-2, checkpoint_every=0),
                   search=SearchSettings(mode="pareto", rounds=2, candidates=3, segments=40))
    return replace(job, **changes)


@pytest.fixture(scope="module")
def searched(own_model, own_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("pareto") / "b"
    train_bundle(search_job(own_model, own_text, out))
    return out


def test_search_records_every_configuration_it_measured(searched):
    bundle = load_bundle(searched)
    doc = bundle.read_json("pareto.json")
    evaluated, trained = bundle.evaluated(), bundle.configs()
    records, rounds = doc["evaluations"], doc["search"]["rounds"]
    # more configurations measured than the initial set (the two budgets' ladder), each recoverable
    ladder = rounds[0]["measured"] - rounds[0]["proposed"]
    assert ladder == 2 and len({r["config"] for r in records}) == len(evaluated) > ladder
    assert evaluated[: len(trained)] == trained
    shapes = {m.name: m.shape for m in bundle.matrices}
    numel = sum(s[0] * s[1] for s in shapes.values())
    for r in records:
        assert r["bytes"] == config_nbytes(get_scheme("onnx"), shapes, evaluated[r["config"]])
        assert r["bits_per_weight"] == 8 * r["bytes"] / numel
    assert {r["step"] for r in records} == {1, 2}  # rounds after steps 1 and 2
    assert [r["step"] for r in rounds] == [1, 2] and all(r["proposed"] >= 1 for r in rounds)
    # front flags: the non-dominated measurements with the final adapter, nothing stale
    final = [r for r in records if r["step"] == 2]
    mask = front_mask(np.array([[r["bits_per_weight"], r["loss"]] for r in final]))
    assert [r["front"] for r in final] == mask.tolist()
    assert not any(r["front"] for r in records if r["step"] != 2)
    hv = doc["hypervolume"]
    norm = Normalisation(tuple(hv["lo"]), tuple(hv["hi"]))
    assert hv["value"] == pytest.approx(norm.hypervolume(np.array([[r["bits_per_weight"], r["loss"]] for r in final])))
    assert hv["reference_point"] == [1.1, 1.1]
    training = bundle.manifest.training
    assert training.search.mode == "pareto" and 0 < training.search_share < 1


def test_recorded_losses_are_the_final_adapter_on_the_fixed_blocks(searched, own_text):
    from coalora_edge.training.data import load_blocks
    from coalora_edge.model.evaluate import lm_score

    bundle = load_bundle(searched)
    restored = restore(bundle)
    valid = load_blocks(restored.tokenizer, [str(own_text)], 32, 0.1).valid[:4]
    config, record = config_at_bpw(bundle, 4.0)
    assert record["front"] and record["step"] == 2
    restored.use(config)
    assert lm_score(restored.wrapper, valid, 4).loss == pytest.approx(record["loss"], abs=1e-6)


def test_a_killed_search_run_resumes_to_the_same_bundle(searched, own_model, own_text, tmp_path, monkeypatch):
    job = search_job(own_model, own_text, tmp_path / "b",
                     settings=TrainSettings(steps=2, batch_size=4, rank=4, alpha=8, lr=1e-2, checkpoint_every=1))
    real_step = Trainer.step

    def dies_at_step_2(self, model, optimizer, run_, step):
        if step == 1:  # after step 1's round and checkpoint
            raise KeyboardInterrupt
        return real_step(self, model, optimizer, run_, step)

    monkeypatch.setattr(Trainer, "step", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_bundle(job)
    monkeypatch.setattr(Trainer, "step", real_step)
    assert json.loads((job.checkpoint_dir / "state.json").read_text())["search"]["rounds"][0]["step"] == 1
    with pytest.raises(CoaloraError, match="made with the Pareto search"):
        train_bundle(replace(job, resume=True, search=SearchSettings(mode="ladder")))
    train_bundle(replace(job, resume=True))
    a, b = load_bundle(searched), load_bundle(job.out)
    assert a.evaluated() == b.evaluated() and a.configs() == b.configs()
    assert a.read_json("pareto.json")["evaluations"] == b.read_json("pareto.json")["evaluations"]
    sa, sb = a.adapter_state(), b.adapter_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def pareto_cli(*args):
    return subprocess.run([sys.executable, "-m", "coalora_edge", "pareto", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_pareto_cli_json_and_plot(searched, tmp_path):
    plot = tmp_path / "front.png"
    proc = pareto_cli(searched, "--json", "--plot", plot, "--compare", searched)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    doc = json.loads((searched / "pareto.json").read_text())
    expected = sorted((r for r in doc["evaluations"] if r["front"]), key=lambda r: r["bits_per_weight"])
    assert [e["config"] for e in out["front"]] == [r["config"] for r in expected]
    assert out["hypervolume"] == doc["hypervolume"] and len(out["rounds"]) == 2
    assert out["front"][0]["formats"] == load_bundle(searched).evaluated()[expected[0]["config"]]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["{tmp}"], "not a coalora-edge bundle"),
    (["{bundle}", "--plot", "{tmp}/missing/front.png"], "does not exist"),
])
def test_pareto_cli_bad_input_is_one_line(searched, tmp_path, args, message):
    proc = pareto_cli(*[a.format(tmp=tmp_path, bundle=searched) for a in args])
    assert proc.returncode == 3 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
