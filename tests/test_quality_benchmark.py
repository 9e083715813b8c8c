"""benchmarks/quality.py's own logic: the dev split, the learning-rate search and the paired bootstrap.

The tables in docs/benchmarks.md rest on these three; the training they drive is the CLI's, tested elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dev_split_halves_every_task_the_same_way_each_time(quality, tmp_path):
    lines = [json.dumps({"task": f"t{i % 3}", "id": i}) for i in range(31)]
    (tmp_path / "dev.jsonl").write_text("\n".join(lines) + "\n")
    tuning, test = quality.split_dev(tmp_path / "dev.jsonl", tmp_path / "a")
    again = quality.split_dev(tmp_path / "dev.jsonl", tmp_path / "b")
    assert [p.read_text() for p in (tuning, test)] == [p.read_text() for p in again]
    halves = [[json.loads(line) for line in p.read_text().splitlines()] for p in (tuning, test)]
    assert sorted(r["id"] for half in halves for r in half) == list(range(31))  # disjoint and complete
    for task in ("t0", "t1", "t2"):
        counts = [sum(r["task"] == task for r in half) for half in halves]
        assert abs(counts[0] - counts[1]) <= 1


@pytest.mark.parametrize("first, best", [(1e-3, 5e-3), (1e-3, 2e-4), (1e-3, 1e-3), (1e-3, 1e-2)])
def test_lr_search_brackets_the_best_rate(quality, monkeypatch, first, best):
    """A loss that is convex in log(lr): the search ends on its minimum, trying only its path's neighbours."""
    import math

    monkeypatch.setitem(quality.VARIANTS, "fake", ([], (1e-4, 1e-2, first)))
    trained = []

    def train(self, label, lr, seed, steps):
        trained.append(lr)
        return {"tuning_loss": (math.log(lr) - math.log(best)) ** 2}

    monkeypatch.setattr(quality.Grid, "train", train)
    grid = quality.Grid.__new__(quality.Grid)
    grid.args = SimpleNamespace(steps=10)
    lr, tried = grid.search_lr("fake")
    assert lr == best and len(trained) == len(set(trained)) == len(tried)
    rates = [r for r in quality.GRID if 1e-4 <= r <= 1e-2]
    span = abs(rates.index(best) - rates.index(first))
    assert len(trained) == span + 3 - (best in (rates[0], rates[-1]))


def runs(loss_sums, exact, choice, tokens):
    return [{"seed": s, "test": {"per_example": {"loss_sum": loss_sums[s], "tokens": tokens,
                                                 "exact_match": exact[s], "choice_acc_norm": choice[s]}}}
            for s in range(len(loss_sums))]


def test_paired_bootstrap_is_zero_for_the_same_runs_and_finds_a_real_gap(quality):
    import random

    rng = random.Random(0)
    n, tokens = 60, [rng.randint(1, 5) for _ in range(60)]
    ref_loss = [[rng.uniform(0, 3) * t for t in tokens] for _ in range(3)]
    exact = [[float(rng.random() < 0.4) for _ in range(n)] for _ in range(3)]
    choice = [[None if i % 3 else float(rng.random() < 0.5) for i in range(n)] for _ in range(3)]
    reference = runs(ref_loss, exact, choice, tokens)

    same = quality.paired(reference, reference, samples=200)
    assert all(same[k] == (0.0, 0.0, 0.0) for k in quality.METRICS)

    better = runs([[v - 0.25 * t for v, t in zip(seed, tokens)] for seed in ref_loss], exact, choice, tokens)
    gap = quality.paired(better, reference, samples=200)
    assert gap["loss"] == pytest.approx((-0.25, -0.25, -0.25))  # the same shift on every example
    assert quality.verdict(*gap["loss"][1:], lower_is_better=True) == "ahead"

    noisy = runs([[v + rng.gauss(0, 1) for v in seed] for seed in ref_loss], exact, choice, tokens)
    estimate, low, high = quality.paired(noisy, reference, samples=500)["loss"]
    assert low < estimate < high and low < 0 < high  # pure noise: the interval holds 0
    assert quality.verdict(low, high, lower_is_better=True).startswith("level")


def test_paired_refuses_runs_on_different_examples(quality):
    a = runs([[1.0, 2.0]], [[1.0, 0.0]], [[None, 1.0]], [1, 2])
    b = runs([[1.0, 2.0]], [[1.0, 0.0]], [[None, 1.0]], [1, 3])
    with pytest.raises(SystemExit, match="differ"):
        quality.paired(a, b)
