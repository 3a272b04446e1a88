"""The install fits beside what an environment has: ranges in setup.cfg, the tested set locked in
constraints.txt, no TensorFlow at run time, and TensorBoard events (written with tensorboardX) that
TensorBoard's own reader reads back."""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import io
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import Specifier
from packaging.utils import canonicalize_name
from PIL import Image
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

from mae_jax import summaries
from tests.conftest import REPO, TINY_MAIN_FLAGS, run_main
from tests.test_multihost import logged_metrics

TESTED_EXTRAS = ("test",)  # what .ci/run installs besides install_requires
# Distributions whose wheel is another build, with more requirements, on some platforms; markers that say so.
PLATFORM_BUILDS = ("torch",)
PLATFORM_MARKERS = ("platform_system", "sys_platform", "platform_machine")


def setup_cfg_requirements() -> dict[str, list[Requirement]]:
    """install_requires and every extra of setup.cfg, as parsed requirements."""
    options = configparser.ConfigParser()
    options.read(REPO / "setup.cfg")

    def parse(lines: str) -> list[Requirement]:
        lines = (line.partition("#")[0].strip() for line in lines.splitlines())
        return [Requirement(line) for line in lines if line]

    groups = {"install_requires": parse(options["options"]["install_requires"])}
    return groups | {f"[{name}]": parse(lines) for name, lines in options["options.extras_require"].items()}


def locked_versions() -> dict[str, str]:
    """Distribution -> version, from constraints.txt (every line `name==version`)."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def added_by_the_platform(requirer: str, dependency: Requirement) -> bool:
    """A requirement that `requirer`'s build for this platform adds: PyPI's torch for Linux is the CUDA build,
    whose own metadata requires cuda-toolkit, nvidia-* and triton on Linux only, at versions it pins itself. The
    tested CPU build (constraints.txt) has none of them."""
    marker = str(dependency.marker or "")
    return requirer in PLATFORM_BUILDS and any(variable in marker for variable in PLATFORM_MARKERS)


def dependency_closure(requirements: list[Requirement], *, platform_builds: bool = True) -> set[str]:
    """The installed distributions that `requirements` pull in, transitively (markers and extras evaluated);
    without what the platform's builds add (`added_by_the_platform`) unless `platform_builds`."""
    found: set[str] = set()
    pending = [(requirement, set(requirement.extras)) for requirement in requirements]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        for line in importlib.metadata.requires(name) or []:
            dependency = Requirement(line)
            if not platform_builds and added_by_the_platform(name, dependency):
                continue
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in {"", *extras}):
                pending.append((dependency, set(dependency.extras)))
    return found


def test_requirements_state_ranges_not_pins():
    for group, requirements in setup_cfg_requirements().items():
        for requirement in requirements:
            operators = {spec.operator for spec in requirement.specifier}
            assert not operators & {"==", "===", "~="}, f"{group}: {requirement} pins a version"
            assert operators & {">=", ">"} and operators & {"<", "<="}, f"{group}: {requirement} lacks a bound"


def test_the_installed_set_is_in_range_and_locked():
    """Each direct requirement's installed version is in its range and is the locked one, and the lock covers
    the whole tested install: every distribution it pulls in, at the version installed here, but for what a
    platform's build of torch adds (the CUDA libraries on Linux), which torch's own metadata pins."""
    groups = setup_cfg_requirements()
    pins = locked_versions()
    tested = groups["install_requires"] + [r for extra in TESTED_EXTRAS for r in groups[f"[{extra}]"]]
    for requirement in tested:
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), f"{installed} outside {requirement}"
    mismatched = {
        name: (importlib.metadata.version(name), pins.get(name))
        for name in sorted(dependency_closure(tested, platform_builds=False))
        if name not in pins or not Specifier(f"=={pins[name]}").contains(importlib.metadata.version(name))
    }  # `==2.13.0` matches the installed 2.13.0+cpu
    assert not mismatched, f"installed vs constraints.txt: {mismatched}"


# What torch 2.13.0's Linux x86_64 wheel on PyPI (the CUDA build) requires besides the CPU build's requirements,
# from its metadata, and some of what those require in turn (cuda-toolkit 13.0.3's, cuda-bindings').
TORCH_LINUX_REQUIREMENTS = [
    "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3; "
    'platform_system == "Linux"',
    'cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'nvidia-cusparselt-cu13==0.8.1; platform_system == "Linux"',
    'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"',
    'nvidia-nvshmem-cu13==3.4.5; platform_system == "Linux"',
    'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
]
LINUX_ONLY = "sys_platform == 'linux' and platform_machine == 'x86_64'"
CUDA_DISTRIBUTIONS = {  # name -> (version, requirements)
    "cuda-toolkit": ("13.0.3.0", [f"nvidia-cublas==13.1.1.3.*; ({LINUX_ONLY}) and extra == 'cublas'",
                                  f"nvidia-cuda-runtime==13.0.96.*; ({LINUX_ONLY}) and extra == 'cudart'"]),
    "nvidia-cublas": ("13.1.1.3", []),
    "nvidia-cuda-runtime": ("13.0.96", []),
    "cuda-bindings": ("13.0.3", ["cuda-pathfinder~=1.1"]),
    "cuda-pathfinder": ("1.3.2", []),
    "nvidia-cudnn-cu13": ("9.20.0.48", ["nvidia-cublas"]),
    "nvidia-cusparselt-cu13": ("0.8.1", []),
    "nvidia-nccl-cu13": ("2.29.7", []),
    "nvidia-nvshmem-cu13": ("3.4.5", []),
    "triton": ("3.7.1", []),
}  # fmt: skip


def test_what_torchs_linux_build_adds_is_not_asked_of_the_lock(monkeypatch: pytest.MonkeyPatch):
    """A stock Linux machine installs PyPI's torch 2.13.0, the CUDA build, whose metadata requires the CUDA
    libraries that constraints.txt (the CPU build's set) does not list: the lock check still holds there."""
    real_requires, real_version = importlib.metadata.requires, importlib.metadata.version

    def requires(name: str) -> list[str] | None:
        name = canonicalize_name(name)
        if name in CUDA_DISTRIBUTIONS:
            return CUDA_DISTRIBUTIONS[name][1]
        return (real_requires(name) or []) + (TORCH_LINUX_REQUIREMENTS if name == "torch" else [])

    def version(name: str) -> str:
        name = canonicalize_name(name)
        if name in CUDA_DISTRIBUTIONS:
            return CUDA_DISTRIBUTIONS[name][0]
        return "2.13.0" if name == "torch" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "requires", requires)
    monkeypatch.setattr(importlib.metadata, "version", version)
    tested = setup_cfg_requirements()["[test]"]
    if sys.platform == "linux":  # the stand-in's markers hold
        assert set(CUDA_DISTRIBUTIONS) <= dependency_closure(tested)
    test_the_installed_set_is_in_range_and_locked()


# A finder placed first sees every attempt to import a module, also one inside a try/except.
IMPORT_PROBE = """
import importlib.abc, json, sys

class Probe(importlib.abc.MetaPathFinder):
    asked = set()

    def find_spec(self, name, path=None, target=None):
        Probe.asked.add(name.partition(".")[0])
        return None

sys.meta_path.insert(0, Probe())
import mae_jax.main, mae_jax.visualize, mae_jax.convert
print(json.dumps({"loaded": "tensorflow" in sys.modules, "asked": sorted(Probe.asked & {"tensorflow", "torch"})}))
"""


def test_the_commands_import_neither_tensorflow_nor_torch():
    """`main`, `visualize` and `convert` load without TensorFlow and torch; tensorboardX is imported only by
    the process that writes events."""
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"loaded": False, "asked": []}


# Process 0 of a run: it writes scalars and an image grid as events, then something (a .pth export) imports torch.
WRITE_EVENTS = """
import json, sys
import numpy as np
from mae_jax import summaries

writer = summaries.Writer(sys.argv[1])
writer.write_scalars(1, {"loss": 0.5})
writer.write_images(1, {"grid": np.zeros((2, 4, 4, 3), np.uint8)})
writer.flush()
loaded_while_writing = "torch" in sys.modules
import torch
print(json.dumps({"torch_while_writing": loaded_while_writing, "torch_later": torch.__name__}))
"""


def test_writing_events_loads_no_torch_and_torch_still_imports_later(tmp_path: pathlib.Path):
    """tensorboardX's writer imports torch where it is installed (it is here: the test extra), which put torch,
    and on GPU hosts its CUDA libraries, into process 0 of every run."""
    assert importlib.util.find_spec("torch") is not None  # installed, so tensorboardX would import it
    result = subprocess.run([sys.executable, "-c", WRITE_EVENTS, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"torch_while_writing": False, "torch_later": "torch"}
    events, ctx = read_events(tmp_path)
    loss = events.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100)["."]["loss"]
    assert [(datum.step, datum.value) for datum in loss] == [(1, 0.5)]


def read_events(logdir: pathlib.Path) -> tuple[data_provider.MultiplexerDataProvider, context.RequestContext]:
    """TensorBoard's own reader, as its dashboards use it (old-style summaries migrated to the plugins')."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return data_provider.MultiplexerDataProvider(multiplexer, str(logdir)), context.RequestContext()


def test_a_runs_events_are_read_back_by_tensorboard(tmp_path: pathlib.Path):
    result = run_main(tmp_path, *TINY_MAIN_FLAGS, "--config.total_steps=3", "--config.log_every_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    logged = logged_metrics(result.stderr)
    assert sorted(logged) == [2, 3]  # every 2 steps and the last

    events, ctx = read_events(tmp_path)
    scalars = events.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100)["."]
    assert {"loss", "grad_norm", "lr", "images_per_sec"} <= scalars.keys()
    for name in ("loss", "grad_norm"):
        written = {datum.step: datum.value for datum in scalars[name]}
        assert written == pytest.approx({step: metrics[name] for step, metrics in logged.items()}, rel=1e-5)

    (image,) = events.read_blob_sequences(ctx, experiment_id="", plugin_name="images", downsample=10)["."][
        "reconstruction"
    ]  # at the last step: the grid saved as reconstruction.png
    width, height, png = (events.read_blob(ctx, blob_key=blob.blob_key) for blob in image.values)
    saved = np.asarray(Image.open(tmp_path / "reconstruction.png").convert("RGB"))
    assert image.step == 3 and (int(height), int(width)) == saved.shape[:2]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), saved)


def test_only_the_process_with_an_events_dir_writes_and_a_flush_writes_everything(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    grid = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)  # two 3 x 5 images: one 3 x 10 grid
    logging_only = summaries.Writer(None)
    logging_only.write_scalars(7, {"loss": 1 / 3, "skipped": 2})
    logging_only.write_images(7, {"grid": grid})
    logging_only.flush()
    assert [record.getMessage() for record in caplog.records] == [
        "[7] loss=0.333333, skipped=2",
        "[7] Got images: {'grid': (2, 3, 5, 3)}.",
    ]

    writer = summaries.Writer(tmp_path)
    writer.write_scalars(1, {"loss": 0.5})
    writer.flush()  # written out: the next summary goes to a new file of its own, also within the same second
    writer.write_scalars(2, {"loss": 0.25})
    writer.write_images(2, {"grid": grid})
    writer.flush()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    events, ctx = read_events(tmp_path)
    loss = events.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100)["."]["loss"]
    assert {datum.step: datum.value for datum in loss} == {1: 0.5, 2: 0.25}
    (image,) = events.read_blob_sequences(ctx, experiment_id="", plugin_name="images", downsample=10)["."]["grid"]
    png = events.read_blob(ctx, blob_key=image.values[2].blob_key)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.concatenate(list(grid), axis=1))


def test_a_loop_ending_in_an_error_leaves_its_summaries_written(tmp_path: pathlib.Path):
    """The `Bookkeeper` closes the event file however the loop ends: tensorboardX keeps summaries queued until
    its file is closed, and closing it from its own exit hook fails on Python 3.12."""
    from mae_jax import loop
    from tests.test_train import FINITE_METRICS, bookkeeper

    writer = summaries.Writer(tmp_path)
    books = bookkeeper(tmp_path, writer, start_step=0, flops_per_step=1.0, log_every_steps=1)
    with pytest.raises(loop.NonFiniteError, match="at step 2"), books:
        books.record(1, np.zeros(()), FINITE_METRICS)
        books.record(2, np.zeros(()), {**FINITE_METRICS, "loss": np.float32(np.nan)})
    events, ctx = read_events(tmp_path)
    loss = events.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100)["."]["loss"]
    assert [(datum.step, datum.value) for datum in loss] == [(1, 1.0)]
