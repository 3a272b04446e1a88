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


def table_lines(report: str, heading: str) -> list[list[str]]:
    """The rows of the table under `## heading`, as cells, the header left out."""
    section = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in cells] for cells in rows[1:]]


def table_rows(report: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under `## heading`, by their first cell."""
    return {cells[0]: cells[1:] for cells in table_lines(report, heading)}


def raw_json(report: str, key: str) -> dict:
    section = report.split(f"### {key}\n", 1)[1]
    return json.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])


# ---------------------------------------------------------------------------------------------------
# The dry run, through the launch script
# ---------------------------------------------------------------------------------------------------
# One item of each kind of plumbing (the rest differ from these in config file, batch or XLA flags, which the
# stand-in tests below follow into the process): the two layouts each in its own process and cache (the other's a
# model override), PyTorch eager and compiled beside JAX with a step loaded from the shared cache, a GPU-only item.
# `bash launch/gpu_benchmark.sh --dry-run` runs all.
DRY_RUN_ITEMS = ("layout_default", "layout_other", "L16_b128_torch", "cudnn")
TORCH_TABLE = "a. ViT-L/16 against transformers' ViTMAE (PyTorch)"


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
    # the backend and device of every figure: the CPU, named as such
    assert "- backend: cpu (DRY RUN: every item with JAX_PLATFORMS=cpu)" in report, report
    assert {cells[2] for cells in statuses.values() if cells[1] == "ok"} == {"cpu: 1 x cpu"}, statuses

    # PyTorch eager (the README's comparison) and compiled with the fused AdamW, each against mae_jax's step
    torch_rows = [cells for cells in table_lines(report, TORCH_TABLE) if cells[0] == "L16_b128_torch"]
    timed = "PyTorch ViTMAE (cpu, bf16 autocast, {}, {})"
    assert [cells[8] for cells in torch_rows] == [
        timed.format("eager", "AdamW not fused"),
        timed.format("torch.compile aot_eager", "fused AdamW"),
    ], torch_rows
    figures = raw_json(report, "L16_b128_torch")
    for cells in torch_rows:  # step s, PyTorch's, their ratio, from the JSON beside them
        assert cells[1] == "JAX cpu: 1 x cpu; PyTorch cpu", cells
        torch_s, mae_s = figures[cells[8]]["step_s"], figures["mae_jax"]["step_s"]
        assert re.fullmatch(NUMBER, cells[3]) and re.fullmatch(NUMBER, cells[9]), cells
        assert cells[11] == f"{torch_s / mae_s:.2f}x", cells
    assert table_rows(report, TORCH_TABLE)["L16_b256_torch"][0] == "not selected"
    # its step came from the cache that layout_default filled (merged from that item's own cache)
    assert torch_rows[0][7].endswith("(cache load)"), torch_rows
    assert figures["compile_s"] < raw_json(report, "layout_default")["compile_s"] / 2

    layouts = table_rows(report, "d. Scanned against unrolled blocks, ViT-L/16 batch 128")
    assert list(layouts) == ["unrolled (the default)", "scanned"], layouts
    assert [cells[0] for cells in layouts.values()] == ["layout_default", "layout_other"], layouts
    assert all(cells[1] == "cpu: 1 x cpu" and re.fullmatch(NUMBER, cells[2]) for cells in layouts.values()), layouts
    assert raw_json(report, "layout_other")["config"]["model"]["scan_blocks"] is True
    cudnn = table_rows(report, "c. XLA against cuDNN attention, ViT-L/16 batch 128")
    assert cudnn["cudnn"][0] == "needs a GPU" and cudnn["L16_b128"][0] == "not selected", cudnn

    for item in ITEMS:  # what each process ran with, from its own JSON
        if item.needs_gpu or item.key not in DRY_RUN_ITEMS:
            assert f"### {item.key}\n" not in report
            continue
        figures = raw_json(report, item.key)
        assert figures["config"]["batch_size"] == item.batch // 32 and figures["config"]["model"]["dtype"] == "bfloat16"
        assert item.xla_flags in figures["xla_flags"] and figures["versions"]["jax"] == jax.__version__
    assert "## Failed, timed out, skipped\n\n- **cudnn**: needs a GPU: not run in a dry run\n" in report, report


# ---------------------------------------------------------------------------------------------------
# Failures, timeouts, the budget and the caches, against a stand-in benchmark
# ---------------------------------------------------------------------------------------------------
STAND_IN = """
import json, os, pathlib, re, sys, time
args = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
open(os.environ["STAND_IN_PIDS"], "a").write(f"{os.getpid()} ")
# As JAX does: read the compilation cache and XLA's autotuning cache, then write what it compiled into both.
cache = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
autotune = pathlib.Path(re.findall(r"--xla_gpu_per_fusion_autotune_cache_dir=(\\S+)", os.environ["XLA_FLAGS"])[-1])
found = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
tuned = sorted(p.name for p in autotune.rglob("*") if p.is_file()) if autotune.exists() else []
seen = {"pid": os.getpid(), "cache": str(cache), "autotune": str(autotune), "found": found, "tuned": tuned}
open(os.environ["STAND_IN_CACHES"], "a").write(json.dumps(seen) + "\\n")
scan_blocks = args.get("--config.model.scan_blocks") == "True"
for folder in (cache, autotune):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"compiled_scan_{scan_blocks}").write_text("")
if "--config.model.kernels=nope" in sys.argv:
    sys.exit("error: model.kernels='nope' must be one of ('custom', 'autodiff')")
if "--hang" in sys.argv:
    print("compiling the step", file=sys.stderr, flush=True)
    time.sleep(600)
batch = int(args["--config.batch_size"])
step = {"step_s": 0.5, "images_per_s": batch / 0.5, "mfu": 0.25, "times_s": [0.5], "compile_s": 3.0}
figures = {
    "device": {"kind": "stand-in", "platform": "cpu", "backend": "cpu", "count": 1},
    "config": {"batch_size": batch, "model": {"scan_blocks": scan_blocks}}, "compile_s": 3.0, "mae_jax": step,
    "peak_memory_bytes": 2**30, "xla_flags": os.environ.get("XLA_FLAGS", ""),
}
open(args["--json"], "w").write(json.dumps(figures))
"""


@pytest.fixture
def stand_in(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A benchmark command that writes figures at once, fails on an invalid override or hangs, and notes its
    process id in STAND_IN_PIDS and what it found in its caches in STAND_IN_CACHES; every item expected to take
    1 s (PyTorch 10 s more)."""
    path = tmp_path / "stand_in.py"
    path.write_text(STAND_IN)
    monkeypatch.setenv("STAND_IN_PIDS", str(tmp_path / "pids"))
    monkeypatch.setenv("STAND_IN_CACHES", str(tmp_path / "caches"))
    monkeypatch.setattr(benchmark_suite.items, "DRY_RUN_S", 1)  # where `Item.estimate_s` reads them
    monkeypatch.setattr(benchmark_suite.items, "TORCH_S", 10)
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


def test_the_budget_skips_what_does_not_fit(
    tmp_path: pathlib.Path, stand_in: tuple[str, str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # the report shows what an item sets beyond the caller's
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
    assert re.match(r"JAX_PLATFORMS=cpu XLA_FLAGS='[^']* --xla_gpu_enable_command_buffer=' ", command), command


def test_the_layouts_compile_in_their_own_processes_with_empty_caches(
    tmp_path: pathlib.Path, stand_in: tuple[str, str]
):
    layout_keys = next(table.keys for table in benchmark_suite.TABLES if table.kind == "layouts")
    follower = next(item for item in ITEMS if item.key == "L16_b128")  # the default layout's step again
    items = [item for item in ITEMS if item.key in layout_keys] + [follower]
    outcomes = benchmark_suite.run_suite(
        tmp_path / "report.md", dry_run=True, budget_s=60, items=items, benchmark=stand_in, scanned=False
    )
    assert [o.status for o in outcomes] == ["ok"] * len(items)
    runs = [json.loads(line) for line in (tmp_path / "caches").read_text().splitlines()]
    layouts, after = runs[:-1], runs[-1]
    assert len({run["pid"] for run in layouts}) == 2, layouts  # two processes, one layout each
    assert [o.figures["config"]["model"]["scan_blocks"] for o in outcomes[:-1]] == [False, True]
    # neither found a compiled program or autotuning results: not the other's, nothing shared
    assert [(run["found"], run["tuned"]) for run in layouts] == [([], [])] * 2, layouts
    # then what both compiled serves the later items, at the path JAX's cache keys were made with
    assert after["found"] == ["autotune/compiled_scan_False", "autotune/compiled_scan_True", "compiled_scan_False",
                              "compiled_scan_True"], after  # fmt: skip
    assert {run["cache"] for run in runs} == {after["cache"]} and [o.cache_load for o in outcomes] == [
        False,
        False,
        True,
    ]


def test_gpu_estimates_follow_the_cache_and_the_layout():
    default, other, with_torch = (next(item for item in ITEMS if item.key == key) for key in
                                  ("layout_default", "layout_other", "L16_b128_torch"))  # fmt: skip
    assert default.program == with_torch.program  # the same step: the second loads it from the cache
    assert default.estimate_s({default.program}, scanned=False, dry_run=False) == 20 + 150  # own cache: compiles
    assert other.estimate_s(set(), scanned=False, dry_run=False) == 20 + 40  # scanned
    assert with_torch.estimate_s({default.program}, scanned=False, dry_run=False) == 20 + 5 + 15 + 90
    assert with_torch.estimate_s(set(), scanned=True, dry_run=False) == 20 + 40 + 15 + 90


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


NVIDIA_SMI = """#!/usr/bin/env bash
# nvidia-smi as the driver prints it: a header with the CUDA version its driver supports; CSV for a query
if [[ $# -eq 0 ]]; then
  echo "+-----------------------------------------------------------------------------------------+"
  echo "| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: {cuda}     |"
  echo "|-----------------------------------------+------------------------+----------------------+"
else
  echo "NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB"
fi
"""


@pytest.mark.parametrize(("cuda", "extra"), [("12.8", "cuda12"), ("13.0", "cuda13")])
def test_gpu_install_step_brings_jax_for_the_drivers_cuda_and_the_suite_refuses_the_cpu(
    tmp_path: pathlib.Path, cuda: str, extra: str
):
    """Here jax has no CUDA plugin (it is the CPU wheel): the install step asks pip for jax[cudaNN] at the
    installed version, for the CUDA the driver reports; JAX then starts no GPU backend, and the suite stops in
    one line instead of benchmarking the CPU."""
    log = tmp_path / "pip.log"
    python = tmp_path / "python"  # a stand-in for pip only; everything else the real interpreter
    python.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        f'  "-m pip "*) echo "$*" >>{log} ;;\n'
        f'  *) exec {sys.executable} "$@" ;;\n'
        "esac\n"
    )
    (tmp_path / "nvidia-smi").write_text(NVIDIA_SMI.format(cuda=cuda))
    for stand_in in (python, tmp_path / "nvidia-smi"):
        stand_in.chmod(0o755)
    report = tmp_path / "report.md"
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    result = launch(str(report), env={"PYTHON": str(python), "PATH": path, "ITEMS": "L16_b128", "BUDGET_S": "1"})
    calls = log.read_text().splitlines() if log.exists() else []
    assert len(calls) == 1 and re.fullmatch(rf"-m pip install --constraint \S+ jax\[{extra}\]==\S+", calls[0]), calls
    assert calls[0].endswith(f"=={importlib.metadata.version('jax')}"), calls
    assert result.returncode == 1, result.stdout + result.stderr
    refusal = "error: JAX has no GPU backend here (JAX_PLATFORMS=cuda: "
    assert result.stderr.splitlines()[-1].startswith(refusal), result.stderr
    assert "Traceback" not in result.stderr and not report.exists(), result.stderr
