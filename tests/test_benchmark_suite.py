"""The GPU benchmark suite: its dry run end to end through launch/gpu_benchmark.sh, failures, timeouts and the
budget against a stand-in benchmark, and the install step's choice of what to install."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from mae_jax import benchmark_suite
from mae_jax.benchmark_suite import ITEMS, Item
from tests.conftest import REPO

SCRIPT = REPO / "launch" / "gpu_benchmark.sh"
NUMBER = r"\d+\.\d+"


def launch(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def table_rows(report: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under `## heading`, by their first cell."""
    section = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def raw_json(report: str, key: str) -> dict:
    section = report.split(f"### {key}\n", 1)[1]
    return json.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])


# ---------------------------------------------------------------------------------------------------
# The dry run, through the launch script
# ---------------------------------------------------------------------------------------------------
# One item of each kind of plumbing (the rest differ from these in config file, batch or XLA flags, which the
# stand-in tests below follow into the process): both layouts in one process, PyTorch beside JAX, a step loaded
# from the shared cache, a model override, a GPU-only item. `bash launch/gpu_benchmark.sh --dry-run` runs all.
DRY_RUN_ITEMS = ("layouts", "L16_b128_torch", "L16_b128", "cudnn", "autodiff")


def test_dry_run_reports_every_item(tmp_path: pathlib.Path):
    report_path = tmp_path / "report.md"
    result = launch("--dry-run", str(report_path), env={"ITEMS": ",".join(DRY_RUN_ITEMS)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to install: every requirement is there" in result.stdout, result.stdout
    assert result.stdout.splitlines()[-1] == f"report: {report_path}", result.stdout
    report = report_path.read_text()

    statuses = table_rows(report, "Items")
    assert list(statuses) == [item.key for item in ITEMS]  # every item, run or not
    expected = {item.key: "needs a GPU" if item.needs_gpu else "ok" for item in ITEMS if item.key in DRY_RUN_ITEMS}
    expected |= {item.key: "not selected" for item in ITEMS if item.key not in DRY_RUN_ITEMS}
    assert {key: cells[1] for key, cells in statuses.items()} == expected, report
    assert "- device: 1 x cpu (cpu)" in report, report

    cells = table_rows(report, "a. ViT-L/16 against transformers' ViTMAE (PyTorch)")
    assert cells["L16_b256_torch"][0] == "not selected", cells
    key = "L16_b128_torch"  # step s, PyTorch's, their ratio
    assert re.fullmatch(NUMBER, cells[key][1]) and re.fullmatch(NUMBER, cells[key][6]), cells[key]
    assert re.fullmatch(rf"{NUMBER}x", cells[key][8]), cells[key]
    figures = raw_json(report, key)
    torch_s, mae_s = figures[next(n for n in figures if n.startswith("PyTorch"))]["step_s"], figures["mae_jax"]
    assert cells[key][8] == f"{torch_s / mae_s['step_s']:.2f}x"  # the ratio of the times beside it
    layouts = table_rows(report, "d. Scanned against unrolled blocks, ViT-L/16 batch 128")
    assert list(layouts) == ["unrolled (the default)", "scanned"], layouts
    assert all(re.fullmatch(NUMBER, cells[0]) for cells in layouts.values()), layouts
    cudnn = table_rows(report, "c. XLA against cuDNN attention, ViT-L/16 batch 128")
    assert cudnn["cudnn"][0] == "needs a GPU" and re.fullmatch(NUMBER, cudnn["L16_b128"][2]), cudnn
    flags = table_rows(report, "f. XLA flags, ViT-L/16 batch 128")
    assert list(flags) == ["L16_b128", "cmdbuf_off", "cmdbuf_loops", "lhs"], flags
    assert re.fullmatch(rf"{NUMBER}x", flags["L16_b128"][-1]) and flags["lhs"][0] == "not selected", flags

    for item in ITEMS:  # what each process ran with, from its own JSON
        if item.needs_gpu or item.key not in DRY_RUN_ITEMS:
            assert f"### {item.key}\n" not in report
            continue
        figures = raw_json(report, item.key)
        assert figures["config"]["batch_size"] == item.batch // 32 and figures["config"]["model"]["dtype"] == "bfloat16"
        assert item.xla_flags in figures["xla_flags"] and figures["versions"]["jax"] == jax.__version__
    assert raw_json(report, "autodiff")["config"]["model"]["kernels"] == "autodiff"
    assert raw_json(report, "layouts")["mae_jax, scanned blocks"]["compile_s"] > 0
    # The baseline's step was compiled by `layouts` (the same program): loaded from the shared cache.
    baseline_compile = table_rows(report, "e. Custom-VJP kernels against jax's autodiff, ViT-L/16 batch 128")
    assert baseline_compile["L16_b128"][6].endswith("(cache load)"), baseline_compile
    assert raw_json(report, "L16_b128")["compile_s"] < raw_json(report, "layouts")["compile_s"] / 2
    assert "## Failed, timed out, skipped\n\n- **cudnn**: needs a GPU: not run in a dry run\n" in report, report


# ---------------------------------------------------------------------------------------------------
# Failures, timeouts and the budget, against a stand-in benchmark
# ---------------------------------------------------------------------------------------------------
STAND_IN = """
import json, os, sys, time
args = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
open(os.environ["STAND_IN_PIDS"], "a").write(f"{os.getpid()} ")
if "--config.model.kernels=nope" in sys.argv:
    sys.exit("error: model.kernels='nope' must be one of ('custom', 'autodiff')")
if "--hang" in sys.argv:
    print("compiling the step", file=sys.stderr, flush=True)
    time.sleep(600)
batch = int(args["--config.batch_size"])
step = {"step_s": 0.5, "images_per_s": batch / 0.5, "mfu": 0.25, "times_s": [0.5], "compile_s": 3.0}
figures = {
    "device": {"kind": "stand-in", "platform": "cpu", "count": 1},
    "config": {"batch_size": batch, "model": {"scan_blocks": False}}, "compile_s": 3.0, "mae_jax": step,
    "peak_memory_bytes": 2**30, "xla_flags": os.environ.get("XLA_FLAGS", ""),
}
open(args["--json"], "w").write(json.dumps(figures))
"""


@pytest.fixture
def stand_in(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A benchmark command that writes figures at once, fails on an invalid override or hangs, and notes its
    process id in STAND_IN_PIDS; every item expected to take 1 s (PyTorch 10 s more)."""
    path = tmp_path / "stand_in.py"
    path.write_text(STAND_IN)
    monkeypatch.setenv("STAND_IN_PIDS", str(tmp_path / "pids"))
    monkeypatch.setattr(benchmark_suite, "DRY_RUN_S", 1)
    monkeypatch.setattr(benchmark_suite, "TORCH_S", 10)
    return sys.executable, str(path)


def test_a_failure_or_a_timeout_is_reported_with_its_reason(tmp_path: pathlib.Path, stand_in: tuple[str, str]):
    items = [
        Item("broken", "an invalid override", "configs/vit_large.py", 128, ("--config.model.kernels=nope",)),
        Item("fine", "runs after the failure", "configs/vit_large.py", 128),
        Item("hangs", "never finishes", "configs/vit_large.py", 128, ("--hang",)),
        Item("late", "after the timeout", "configs/vit_large.py", 128),
    ]
    report_path = tmp_path / "report.md"
    outcomes = benchmark_suite.run_suite(
        report_path, dry_run=True, budget_s=6, items=items, benchmark=stand_in, scanned=False
    )
    assert [o.status for o in outcomes] == ["failed", "ok", "timed out", "skipped"]
    report = report_path.read_text()
    assert "- **broken**: failed: exit code 1; stderr ended:" in report, report
    assert "error: model.kernels='nope' must be one of ('custom', 'autodiff')" in report, report
    assert "- **hangs**: timed out: killed after 6 s, what was left of the budget" in report, report
    assert "compiling the step" in report, report
    assert re.search(r"- \*\*late\*\*: skipped: does not fit the budget: expected ~1 s, 0 s left", report), report
    assert "Next window: `--items=broken,hangs,late`" in report, report
    assert raw_json(report, "fine")["mae_jax"]["step_s"] == 0.5
    hung = int((tmp_path / "pids").read_text().split()[2])
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(hung, 0)


def test_the_budget_skips_what_does_not_fit(tmp_path: pathlib.Path, stand_in: tuple[str, str]):
    items = [
        Item("with_torch", "expected 11 s", "configs/vit_large.py", 128, torch=True),
        Item("alone", "expected 1 s", "configs/vit_large.py", 128, xla_flags="--xla_gpu_enable_command_buffer="),
    ]
    report_path = tmp_path / "report.md"
    outcomes = benchmark_suite.run_suite(
        report_path, dry_run=True, budget_s=5, items=items, benchmark=stand_in, scanned=False
    )
    assert [o.status for o in outcomes] == ["skipped", "ok"]
    report = report_path.read_text()
    assert "- **with_torch**: skipped: does not fit the budget: expected ~11 s, 5 s left" in report, report
    assert raw_json(report, "alone")["xla_flags"].endswith("--xla_gpu_enable_command_buffer=")
    command = report.split("### alone\n\n```\n", 1)[1].splitlines()[0]  # a shell line, with the flags it ran with
    assert re.match(r"XLA_FLAGS='[^']* --xla_gpu_enable_command_buffer=' JAX_PLATFORMS=cpu ", command), command


def test_gpu_estimates_follow_the_cache_and_the_layout():
    layouts, with_torch = ITEMS[0], ITEMS[1]
    assert layouts.program == with_torch.program  # the same step: the second loads it from the cache
    assert layouts.estimate_s(set(), scanned=False, dry_run=False) == 20 + 150 + 40
    assert with_torch.estimate_s({layouts.program}, scanned=False, dry_run=False) == 20 + 5 + 15
    assert with_torch.estimate_s(set(), scanned=True, dry_run=False) == 20 + 40 + 15


# ---------------------------------------------------------------------------------------------------
# The install step
# ---------------------------------------------------------------------------------------------------
def test_missing_requirements_names_only_what_is_not_found(tmp_path: pathlib.Path):
    assert benchmark_suite.missing_requirements() == []  # this environment has all of setup.cfg's
    setup_cfg = tmp_path / "setup.cfg"
    setup_cfg.write_text(
        "[options]\ninstall_requires =\n    numpy>=2\n    absl-py>=2  # comment\n    pillow>=1\n"
        "    no-such-distribution>=1.0,<2\n    orbax-no-such-module>=1\n"
        "[options.extras_require]\ntest =\n    no-such-test-tool>=1\n    torch>=2.13.0,<3\n"
    )
    assert benchmark_suite.missing_requirements(setup_cfg) == [
        "no-such-distribution>=1.0,<2",
        "orbax-no-such-module>=1",
    ]


def test_install_step_installs_what_is_missing_keeping_jax(tmp_path: pathlib.Path):
    log = tmp_path / "pip.log"
    python = tmp_path / "python"  # pip and the missing list stand-ins; everything else the real interpreter
    python.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        '  *--missing_requirements*) printf "ml-collections>=1.1.0,<2\\ngrain>=0.2.18,<0.3\\n" ;;\n'
        f'  "-m pip "*) echo "$*" >>{log}; for a; do [[ -f $a ]] && cat "$a" >>{log}; done; true ;;\n'
        f'  *) exec {sys.executable} "$@" ;;\n'
        "esac\n"
    )
    python.chmod(0o755)
    wheels = tmp_path / "wheels"
    for env in ({"WHEELS": str(wheels)}, {}):
        result = launch("--dry-run", str(tmp_path / "report.md"), env={"PYTHON": str(python), "ITEMS": "cudnn", **env})
        assert result.returncode == 0, result.stderr[-3000:]
    calls = log.read_text().splitlines()
    source = f"--no-index --find-links {wheels} "
    pins = r"--constraint \S+ ml-collections>=1\.1\.0,<2 grain>=0\.2\.18,<0\.3"
    assert re.fullmatch(rf"-m pip install {re.escape(source)}{pins}", calls[0]), calls
    kept = [f"{name}=={importlib.metadata.version(name)}" for name in ("jax", "jaxlib")]
    assert calls[1:3] == kept, calls  # the constraints file: the installed jax stays
    assert re.fullmatch(rf"-m pip install {pins}", calls[3]), calls
