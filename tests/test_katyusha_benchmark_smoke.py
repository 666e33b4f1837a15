"""Smoke test of benchmarks/katyusha.py on a tiny setting: it runs and writes its tables (numbers not judged)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from tests.test_benchmarks_smoke import run_benchmark


def test_katyusha_benchmark_runs_and_writes_its_tables(tmp_path: Path) -> None:
    text = run_benchmark(
        "katyusha.py",
        tmp_path,
        *("--n", "128", "--dim", "8", "--gaps", "0.05", "--workers", "1,2", "--seeds", "1", "--max-passes", "4"),
        *("--targets", "0.5,0.1", "--lr-grid", "1,4", "--tau-grid", "0.1", "--real-workers", "0"),
        timeout=120,
    )
    for label in ("SGD", "SVRG", "Katyusha X (τ tuned)", "Katyusha X (τ theory)"):
        for workers in (1, 2):
            assert re.search(rf"^\| {re.escape(label)} \| {workers} \|", text, re.MULTILINE), (label, workers)
    assert re.search(
        r"^\| gap 0.05: Katyusha X \(τ tuned\) needs fewer passes than SVRG to 0.1, at every P \| P=1 [\d.]+ vs "
        r"[\d.]+, P=2 [\d.]+ vs [\d.]+ .*\| (met|missed) \|$",
        text,
        re.MULTILINE,
    )
    assert re.search(
        r"^\| gap 0.05: Katyusha X \(τ theory\) needs no more passes than SVRG in any \(P, target\) pair \| fewer in "
        r"\d+ of \d+ \(P, target\) pairs, as many in \d+, more in \d+; .*\| (met|missed) \|$",
        text,
        re.MULTILINE,
    )
    assert "Real run" not in text  # --real-workers 0
    with open(tmp_path / "katyusha.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2 * 2  # methods x worker counts x targets
    assert {row["method"] for row in rows} == {"sgd", "svrg", "katyusha_x", "katyusha_x_theory"}
    assert {row["tau"] == "" for row in rows if row["method"] in ("sgd", "svrg")} == {True}
    with open(tmp_path / "katyusha_curves.csv") as handle:
        curves = list(csv.DictReader(handle))
    reached = {(row["method"], row["workers"]) for row in rows if row["target"] == "0.1" and row["passes"] != "inf"}
    assert {(row["method"], row["workers"]) for row in curves} == reached
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["benchmark"] == "katyusha" and meta["real_run"] is None
    assert [p["gap"] for p in meta["problem"]] == [0.05] and meta["problem"][0]["nonconvex_fraction"] > 0
    assert (tmp_path / "katyusha.png").stat().st_size > 0
