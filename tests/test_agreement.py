"""How an export's next-token distributions are compared with what it should compute:
top-1 agreement is judged where it is stable, away from near-ties (issue 15, item 9)."""

import torch

from coalora_edge.exporters.common.report import DECISIVE_MARGIN, agreement, agreement_checks


def _logits(gaps: list[float], vocab: int = 8) -> torch.Tensor:
    """One position per gap: token 0 leads token 1 by ``gap`` nats, the rest far behind."""
    rows = torch.full((len(gaps), vocab), -10.0)
    rows[:, 0] = torch.tensor(gaps)
    rows[:, 1] = 0.0
    return rows


def test_near_ties_that_flip_do_not_fail_the_check_and_decisive_flips_do():
    gaps = [0.01] * 50 + [3.0] * 50  # half near-ties
    reference = _logits(gaps)
    swapped = reference.clone()
    swapped[:50, [0, 1]] = swapped[:50, [1, 0]]  # a float-level wobble flips the near-ties
    found = agreement(reference, swapped)
    assert (found.positions, found.top1, found.decisive_positions, found.decisive_top1) == (100, 0.5, 50, 1.0)
    assert all(ok for ok, _ in agreement_checks("llama.cpp", found.as_dict(), max_kl=0.02, min_top1=0.95))

    wrong = reference.clone()
    wrong[50:60, [0, 1]] = wrong[50:60, [1, 0]]  # a decisive token moved: a different model
    found = agreement(reference, wrong)
    assert found.decisive_top1 == 0.8
    failed = [message for ok, message in agreement_checks("llama.cpp", found.as_dict(), 1.0, 0.95) if not ok]
    assert failed == [f"top-1 agreement of llama.cpp 0.800 < 0.95 over the 50 of 100 positions where the top "
                      f"token leads by >= {DECISIVE_MARGIN} nats"]


def test_without_decisive_positions_only_kl_decides():
    flat = torch.zeros(10, 4)
    found = agreement(flat, flat)
    assert (found.decisive_positions, found.decisive_top1, found.kl) == (0, 1.0, 0.0)
