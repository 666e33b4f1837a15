"""The report step regenerates every stored benchmark result from its CSV files and meta.json, without training.

Each results folder is copied to a temporary folder first (the repository stays as it is); its regenerated markdown
must equal the committed one, and its plots must be written again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import clean_launch_env

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FOLDERS = sorted(meta.parent for meta in RESULTS.rglob("meta.json"))


def copy_results(tmp_path: Path) -> list[tuple[Path, Path]]:
    """(committed folder, its copy without the markdown and plots) for every results folder."""
    pairs = []
    for folder in FOLDERS:
        copy = tmp_path / folder.relative_to(RESULTS)
        copy.mkdir(parents=True)
        for path in folder.iterdir():
            if path.is_file() and path.suffix in (".csv", ".json"):
                shutil.copy(path, copy)
        pairs.append((folder, copy))
    return pairs


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=clean_launch_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def test_every_stored_result_regenerates_its_report(tmp_path: Path) -> None:
    expected = {"overhead", "reproduce", "straggler", "netcluster", "netcluster-batch32", "katyusha"}
    assert {f.name for f in FOLDERS} >= expected
    pairs = copy_results(tmp_path)
    run(str(ROOT / "benchmarks" / "report.py"), *(str(copy) for _, copy in pairs))
    for folder, copy in pairs:
        for committed in folder.glob("*.md"):
            if committed.name == "SECTION.md":  # hand-written text for RESULTS.md, not a report
                continue
            assert (copy / committed.name).read_text() == committed.read_text(), committed
        for plot in folder.glob("*.png"):
            assert (copy / plot.name).stat().st_size > 0, plot


def test_a_script_rewrites_its_report_with_report_only(tmp_path: Path) -> None:
    folder, copy = next((f, c) for f, c in copy_results(tmp_path) if f.name == "overhead")
    output = run(str(ROOT / "benchmarks" / "overhead.py"), "--report-only", str(copy))
    assert output.startswith("## Step time and bytes per step")
    assert (copy / "overhead.md").read_text() == (folder / "overhead.md").read_text()
