"""The CLI's numeric options under arbitrary values (hypothesis): every value either works
or ends in one line with a usage/bad-input code, never in an internal error or a traceback
(issue 15: `--budgets nan` once failed with `internal error: ValueError` after loading)."""

from __future__ import annotations

from pathlib import Path

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from coalora_edge.cli.commands import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

#: how a fuzzed command may end (cli/common.py EXIT_CODES): success, usage, bad input,
#: not enough memory or disk
ALLOWED = {0, 2, 3, 6}
#: what a user might type where a number goes
NUMBERS = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "-inf", "1e309", "-0", "0x10", "1_000", "3,,4", "4.5,", ",", "٣", "1e-320"]),
    st.text(max_size=6),
)
#: the same, but a valid number stays small: huge valid step counts or ranks are real work
SMALL_NUMBERS = st.one_of(
    st.integers(-3, 4).map(str),
    st.floats(-1, 4).map(repr),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e309", "-0", "0x10", "3,,4", "4.5,", ",", "٣", "1e-320"]),
    st.text(max_size=6).filter(lambda s: not _large(s)),
)
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _large(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and abs(float(text)) > 4
    except ValueError:
        return False


def _ends_cleanly(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in ALLOWED, (args, result.exit_code, result.output)
    if result.exit_code:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture(scope="module")
def export_dir(small_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "export"
    done = CliRunner().invoke(app, ["export", str(small_bundle), "--bpw", "8.5", "--out", str(out)])
    assert done.exit_code == 0, done.output
    return out


@FUZZ
@given(option=st.sampled_from(["--max-tokens", "--threads"]), value=NUMBERS)
def test_run(export_dir, option, value):
    _ends_cleanly("run", export_dir, "--prompt", "Once upon a time", "--max-tokens", "4", option, value)


@FUZZ
@given(option=st.sampled_from(["--bpw", "--seq-len", "--max-blocks", "--batch-size"]), value=NUMBERS)
def test_eval(small_bundle, own_text, option, value):
    _ends_cleanly("eval", small_bundle, "--data", own_text, "--seq-len", "32", "--max-blocks", "1", option, value)


@FUZZ
@given(option=st.sampled_from(["--bpw", "--accuracy-level"]), value=NUMBERS)
def test_export(small_bundle, tmp_path, option, value):
    _ends_cleanly("export", small_bundle, "--out", tmp_path / "out", "--force", "--bpw", "8.5", option, value)


TRAIN_OPTIONS = ["--budgets", "--lr", "--rank", "--alpha", "--steps", "--epochs", "--batch-size", "--seq-len", "--k",
                 "--ladder-step", "--eval-blocks", "--seed", "--checkpoint-every", "--weight-decay", "--config-model-lr",
                 "--search-rounds", "--candidates", "--segments"]


@settings(FUZZ, max_examples=40)
@given(option=st.sampled_from(TRAIN_OPTIONS), value=SMALL_NUMBERS)
def test_train(own_model, own_text, tmp_path, option, value):
    # a run that is valid stays short: no steps of training unless the option asks for some
    _ends_cleanly("train", own_model, "--data", own_text, "--out", tmp_path / "bundle", "--force", "--budgets", "8.5",
                  "--seq-len", "32", "--eval-blocks", "1", "--steps", "1", "--batch-size", "2", option, value)
