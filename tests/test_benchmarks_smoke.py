"""Smoke tests of the benchmark scripts: each runs on a tiny setting, so the scripts do not rot.

The benchmarks themselves are not part of the test suite (they take minutes and measure time). Each script runs in a
subprocess with a deadline and an environment cleaned of launch variables; the assertions are about what the
scripts write, not about the numbers, except where a number is exact (bytes per step against the formulas).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import clean_launch_env

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` and require exit code 0.

    ``timeout`` keeps a hung script from hanging the suite; it is no judgement of speed: on a 2-core machine with
    other jobs running, the reproduce smoke run took over 240 s (the former limit). Callers pass the script a short
    collective timeout (``--timeout 60``), so a hang inside a job fails sooner, with an error naming the rank.
    """
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=ROOT,
        env=clean_launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def run_benchmark(script: str, out: Path, *args: str, timeout: float = 600) -> str:
    """Run ``benchmarks/<script> <args> --out <out>`` (see :func:`run_script`) and return its Markdown report
    ``out/<script stem>.md``, which must record the command it was run with."""
    run_script(script, *args, "--out", str(out), timeout=timeout)
    text = (out / f"{Path(script).stem}.md").read_text()
    assert f"- command: `python benchmarks/{script} {args[0]} {args[1]}" in text
    return text


def test_overhead_runs_and_bytes_match_the_formulas(tmp_path: Path) -> None:
    text = run_benchmark(
        "overhead.py",
        tmp_path,
        *("--models", "cnn7", "--workers", "2", "--taus", "2", "--steps", "2", "--warmup", "1", "--batch-size", "4"),
        *("--budget", "0", "--min-repeats", "1", "--max-repeats", "1", "--timeout", "60"),
    )
    labels = ("floor", "lsgd tau=2", "easgd tau=2", "dataparallel", "ddp", "dpsgd ring", "dpsgd exponential", "d2")
    for label in (*labels, "adpsgd", "signum"):
        assert f"| {label} |" in text
    # Everything but "ddp" is metered; bytes per step are exact, whatever the timing noise. CNN7 has no buffers,
    # d' = d: with P = 2 every gossip strategy sends its 4·d bytes to the one other worker, Signum 4·ceil(d/32).
    assert "| cnn7, P=2: bytes/step match the formulas | 11/11 metered configurations exact | met |" in text
    for label in ("diloco tau=2", "streaming_diloco tau=2"):
        assert re.search(rf"\| {label} \|.*\| yes \|", text), label
    d = 351_946
    assert re.search(rf"\| diloco tau=2 \|.*\| {4 * d // 2:,} \| {4 * d // 2:,} \| yes \|", text)
    for label in ("dpsgd ring", "dpsgd exponential", "d2", "adpsgd"):
        assert re.search(rf"\| {label} \|.*\| {4 * d:,} \| {4 * d:,} \| yes \|", text), label
    assert re.search(rf"\| signum \|.*\| {4 * -(-d // 32):,} \| {4 * -(-d // 32):,} \| yes \|", text)
    assert "d2: momentum=0.0, nesterov=False" in text  # the optimizer each strategy needs, said in the report
    assert (tmp_path / "overhead.png").stat().st_size > 0
    assert len((tmp_path / "overhead.csv").read_text().splitlines()) == 1 + 12


def _tiny_image_folder(root: Path) -> None:
    from PIL import Image

    generator = __import__("random").Random(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = bytes(generator.randrange(256) for _ in range(32 * 32 * 3))
                Image.frombytes("RGB", (32, 32), pixels).save(folder / f"{i}.png")


def test_reproduce_records_curves_and_leaders(tmp_path: Path) -> None:
    _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    run_script(
        "reproduce.py",
        *("--data-root", str(tmp_path / "data"), "--workers", "2", "--strategies", "lsgd,d2,signum,sgd"),
        *("--train-per-class", "8", "--test-per-class", "4", "--val-every", "2", "--max-steps", "4"),
        *("--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"), "--timeout", "60"),
        *("--out", str(out)),
        *("data.batch_size=4", "data.eval_batch_size=4", "lsgd:strategy.tau=2"),  # D² and Signum have no tau
    )
    text = (out / "reproduce.md").read_text()
    for label in ("lsgd (2 workers)", "d2 (2 workers)", "signum (2 workers)", "SGD (1 worker)"):
        assert f"| {label} |" in text
    assert re.search(r"\| lsgd \(2 workers\) \| 2 \| \d / \d \|", text), text  # 4 steps, tau=2: two rounds
    # D² and Signum refuse the preset's Nesterov SGD: the script changed their optimizer, and the report says so
    assert "- d2 runs with `optim.momentum=0 optim.nesterov=false`" in text
    assert "- signum runs with `optim.nesterov=false optim.lr=1e-3`" in text
    # LSGD is evaluated as the paper evaluates it: the workers' average (BatchNorm statistics re-estimated)
    assert "- lsgd runs with `strategy.eval_on=average strategy.bn_recalibration_batches=20`" in text
    curves = (out / "reproduce_curves.csv").read_text().splitlines()
    assert len(curves) == 1 + 4 * 2  # an evaluation every 2 of 4 steps, for each run
    assert (out / "reproduce_error.png").stat().st_size > 0
    assert (out / "reproduce_leader.png").stat().st_size > 0


def _namespaces(tag: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(tag)]


def _netcluster(out: Path) -> subprocess.Popen[str]:
    args = ["--nodes", "3", "--rates", "100mbit", "--configs", "floor,lsgd-chain", "--samples", "96"]
    args += ["--batch-size", "8", "--tau", "2", "--deadline", "120", "--out", str(out)]
    return subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "netcluster.py"), *args],
        cwd=ROOT,
        env=clean_launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As in a terminal: a test runner started in the background (CI) inherits SIGINT ignored, and Python then
        # never raises KeyboardInterrupt, so the Ctrl-C test would interrupt nothing.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_netcluster_runs_or_says_why_not_and_leaves_no_namespace(tmp_path: Path) -> None:
    proc = _netcluster(tmp_path)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-5000:]
    if "netcluster: skipped, nothing measured:" in output:
        assert not (tmp_path / "netcluster.md").exists()
        return
    text = (tmp_path / "netcluster.md").read_text()
    assert "| floor |" in text and "| lsgd-chain |" in text
    # the chain sends one copy from the leader's link per round (plus headers); 3 nodes, 4 steps, tau=2: 2 rounds
    assert re.search(r"\| lsgd-chain \|.*\| 1\.\d\d \(1\.\d\d-1\.\d\d\) \|", text), text
    assert _namespaces(f"lsgdnc{proc.pid}") == []


def test_netcluster_removes_its_namespaces_when_interrupted(tmp_path: Path) -> None:
    if os.geteuid() != 0 or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("needs root and iproute2 (network namespaces)")
    proc = _netcluster(tmp_path)
    tag = f"lsgdnc{proc.pid}"
    try:
        end = time.monotonic() + 60
        while len(_namespaces(tag)) < 4 and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.1)
        if proc.poll() is not None and "skipped" in (proc.stdout.read() if proc.stdout else ""):
            pytest.skip("this machine cannot create the namespaces")
        assert len(_namespaces(tag)) == 4, "the cluster (switch + 3 nodes) never came up"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert _namespaces(tag) == []


def test_gpu_check_skips_without_a_gpu_and_its_checks_run_on_cpu() -> None:
    """Without CUDA the GPU check says it skipped and exits 0; its checks themselves run on the CPU (a dry run of
    the script, so that it works the day a GPU machine runs it)."""
    if not __import__("torch").cuda.is_available():
        skipped = run_script("gpu_check.py")
        assert "SKIPPED: no CUDA device" in skipped.stdout
    dry = run_script("gpu_check.py", "--device", "cpu", "--quick", "--checks", "kernels,fit/lsgd,precision,hot-path")
    verdicts = re.findall(r"^(PASS|FAIL) (\S+)", dry.stdout, flags=re.M)
    assert [label for _, label in verdicts] == ["kernels", "fit/lsgd", "precision/bf16-mixed", "hot-path"], dry.stdout
    assert {verdict for verdict, _ in verdicts} == {"PASS"}, dry.stdout


def _time_to_accuracy(out: Path, data: Path, network: str, *extra: str) -> str:
    args = ["--data-root", str(data), "--nodes", "2", "--strategies", "lsgd-overlap", "--seeds", "0"]
    args += ["--budget", "2", "--eval-every", "1", "--check-every", "2", "--tau", "2", "--batch-size", "4"]
    args += ["--eval-batch-size", "8", "--timeout", "60", "--deadline", "120", "--network", network]
    args += ["--cache-dir", str(out.parent / "cache"), "--subnet", "10.215.0", "--out", str(out), *extra]
    return run_script("time_to_accuracy.py", *args).stdout


def test_time_to_accuracy_records_runs_skips_them_on_rerun_and_reports(tmp_path: Path) -> None:
    """Two nodes (namespaces at 20 Mbit/s where this machine can make them, else plain processes on loopback), one
    run of LSGD with the overlapped round, two seconds of training: the per-run file, the CSV files, the report; a
    rerun finds the run done; ``--report-only`` rewrites the report from the CSV files."""
    _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    capable = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
    network = "netns" if capable else "loopback"
    first = _time_to_accuracy(out, tmp_path / "data", network)
    if "skipped, nothing measured" in first:  # root, but no namespaces here (a container without the capability)
        network = "loopback"
        first = _time_to_accuracy(out, tmp_path / "data", network)
    assert "1 run(s) to do, 0 already stored" in first
    record = json.loads((out / "runs" / "lsgd-overlap-seed0.json").read_text())
    points = record["points"]
    assert points[0]["train_s"] == 0.0 and points[0]["step"] == 0  # the starting point
    assert points[-1]["train_s"] >= 2.0 and record["steps"] == points[-1]["step"] > 0  # the budget was spent
    assert all(0.0 <= p["error"] <= 1.0 for p in points) and record["rounds"] >= 1
    if network == "netns":
        assert min(record["tx_bytes"]) > 0  # wire bytes of both nodes, evaluation traffic excluded
    text = (out / "time_to_accuracy.md").read_text()
    assert re.search(r"\| lsgd-overlap \| 1 \|", text), text
    assert "- one strategy only: no ordering to judge" in text
    assert len((out / "time_to_accuracy_curves.csv").read_text().splitlines()) == 1 + len(points)
    assert (out / "time_to_accuracy.png").stat().st_size > 0
    again = _time_to_accuracy(out, tmp_path / "data", network)
    assert "0 run(s) to do, 1 already stored" in again
    text = (out / "time_to_accuracy.md").read_text()  # meta.json now records the second command
    (out / "time_to_accuracy.md").unlink()
    run_script("time_to_accuracy.py", "--report-only", str(out))
    assert (out / "time_to_accuracy.md").read_text() == text


def test_time_to_accuracy_orderings_and_times() -> None:
    """The report's arithmetic: interpolated errors, time to a target, and what the seeds support."""
    sys.path.insert(0, str(BENCHMARKS))
    from time_to_accuracy_report import CurvePoint, error_at, ordering, time_to

    curve = [CurvePoint("lsgd", 0, t, t, 0, e, err) for t, e, err in ((0, 0, 0.9), (10, 1, 0.5), (20, 2, 0.3))]
    assert error_at(curve, 5.0) == pytest.approx(0.7) and error_at(curve, 1.5, "epoch") == pytest.approx(0.4)
    assert math.isnan(error_at(curve, 21.0)) and time_to(curve, 0.5) == 10 and math.isnan(time_to(curve, 0.2))
    assert error_at(curve, 20.0 + 1e-12) == 0.3 and error_at(curve, 2.0 + 1e-12, "epoch") == 0.3  # the end, rounded
    low, high = {0: 0.2, 1: 0.25, 2: 0.22}, {0: 0.3, 1: 0.31, 2: 0.28}
    assert ordering("a", low, "b", high, "final error").startswith("**supported**: a below b")
    assert ordering("b", high, "a", low, "final error").startswith("**supported**: a below b")
    paired = {0: 0.29, 1: 0.3, 2: 0.27}  # below `high` at every seed, but the ranges overlap
    assert ordering("a", paired, "b", high, "final error").startswith("suggested only: a below b")
    assert ordering("a", {0: 0.2, 1: 0.4}, "b", {0: 0.3, 1: 0.3}, "x").startswith("not supported")
    assert "fewer than 3 seeds" in ordering("a", {0: 0.1}, "b", {0: 0.2}, "x")


def test_resnet20_gpu_prints_the_full_commands_and_runs_its_cpu_smoke_mode(tmp_path: Path) -> None:
    """The GPU reproduction's own path (workers as one-device "nodes" sharing a device, gloo) on the CPU, 3 steps."""
    _tiny_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = run_script(
        "resnet20_gpu.py",
        *("--smoke", "--strategies", "lsgd", "--data-root", str(tmp_path / "data"), "--timeout", "60"),
        *("--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"), "--out", str(out)),
    )
    full = "lsgd-train experiment=cifar10_resnet20 trainer=gpu data=imagefolder"
    assert all(f"{full} data.root={tmp_path / 'data'}" in line for line in result.stdout.splitlines() if full in line)
    assert result.stdout.count(full) == 3 and "--preset cifar10_resnet20" in result.stdout
    text = (out / "reproduce.md").read_text()
    assert re.search(r"\| lsgd \(2 workers\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 3 \|", text), text
    assert "- command: `python benchmarks/resnet20_gpu.py --smoke" in text
    assert "preset `resnet20_1gpu`" in text


def test_equal_bytes_runs_the_app_and_reports_each_configuration(tmp_path: Path) -> None:
    """Two configurations, one seed, 2 workers, 32 batches of mnist5k: the app's sweeps run, the table has a row per
    configuration, and LSGD's metered bytes equal DiLoCo's up to the 4·P bytes of the losses (exact, not timed)."""
    text = run_benchmark(
        "equal_bytes.py",
        tmp_path,
        *("--datasets", "mnist5k", "--configs", "lsgd,diloco", "--seeds", "0", "--workers", "2"),
        *("--mnist-epochs", "1", "--limit-batches", "32", "--work-dir", str(tmp_path / "work")),
    )
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"lsgd", "diloco"}
    for name in ("lsgd", "diloco"):
        assert rows[name][2:4] == ["1", "32"]  # runs, steps per worker
    assert rows["diloco"][-1].rstrip(" |") == "1.000" and rows["lsgd"][-1].rstrip(" |") == "1.000"
    assert (tmp_path / "equal_bytes.png").stat().st_size > 0


def test_store_transfer_times_copies_and_transactions_through_the_board(tmp_path: Path) -> None:
    """CNN7's size, 2 workers, 2 repeats, both transports: two timed copies each way alone and one contended row per
    job and transport."""
    text = run_benchmark(
        "store_transfer.py", tmp_path, *("--models", "cnn7", "--workers", "2", "--repeats", "2", "--timeout", "60")
    )
    for transport in ("rpc", "store"):  # 4 · 351,946 bytes per copy
        assert re.search(rf"\| cnn7 \| {transport} \| 2 \| 1\.4 \| [\d.,]+ \[", text), text
    with open(tmp_path / "store_transfer.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for transport in ("rpc", "store"):
        kinds = sorted(row["kind"] for row in rows if row["transport"] == transport)
        assert kinds == ["get alone"] * 2 + ["put alone"] * 2 + ["transaction, contended"]
    assert all(float(row["seconds"]) > 0 for row in rows)
