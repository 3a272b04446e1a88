"""The install step's questions (standard library only: it runs before the dependencies are there): which of
setup.cfg's requirements are missing, which `jax[cudaNN]` the NVIDIA driver runs, and the installed jax pins."""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

from mae_jax.benchmark_suite.items import REPO

MODULES = {  # distribution -> the module that shows it is installed, where the names differ
    "absl-py": "absl",
    "etils": "etils.epath",
    "ml-collections": "ml_collections",
    "orbax-checkpoint": "orbax.checkpoint",
    "pillow": "PIL",
    "scikit-image": "skimage",
    "tensorflow-datasets": "tensorflow_datasets",
}
COMPARED_WITH = ("torch", "transformers")  # from the test extra: only --torch needs them
CUDA_PLUGIN = re.compile(r"jax[-_]cuda\d+[-_]plugin")  # the distribution that gives jax its CUDA backend
JAX_CUDA_MAJORS = (13, 12)  # jax's extras cuda13 and cuda12, newest first


def cuda_plugins() -> list[str]:
    return sorted(
        d.metadata["Name"] for d in importlib.metadata.distributions() if CUDA_PLUGIN.fullmatch(d.metadata["Name"])
    )


def driver_cuda_version() -> tuple[int, int]:
    """The newest CUDA the NVIDIA driver supports, as `nvidia-smi` prints it in its header ("CUDA Version: 12.8");
    exits with one line where there is no driver to ask."""
    if shutil.which("nvidia-smi") is None:
        sys.exit("error: nvidia-smi not found: no NVIDIA driver to run the GPU benchmark on (--dry-run runs the CPU)")
    try:
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        sys.exit("error: nvidia-smi did not answer within 60 s: the NVIDIA driver is not ready")
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", result.stdout)
    if match is None:
        why = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()[0]
        sys.exit(f"error: nvidia-smi names no CUDA version ({why}): the NVIDIA driver is not working")
    return int(match[1]), int(match[2])


def jax_for_gpu(requirement: str) -> str:
    """The jax requirement that brings the CUDA plugin for this driver: `jax[cuda13]` or `jax[cuda12]`, the newest
    CUDA both the driver and jax support, at the installed jax's version (else setup.cfg's range). Plain `jax` is
    the CPU wheel: JAX would then run everything on the CPU with a warning only."""
    major, minor = driver_cuda_version()
    try:
        installed = importlib.metadata.version("jax")
        offered = importlib.metadata.metadata("jax").get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:
        installed, offered = None, [f"cuda{m}" for m in JAX_CUDA_MAJORS]
    usable = [m for m in JAX_CUDA_MAJORS if m <= major and f"cuda{m}" in offered]
    if not usable:
        sys.exit(
            f"error: the NVIDIA driver supports CUDA {major}.{minor}; jax's CUDA wheels need CUDA 12 or 13 "
            f"({' '.join(offered) or 'no extras'} offered by jax {installed}): update the driver"
        )
    extra = f"jax[cuda{usable[0]}]"
    chosen = f"{extra}=={installed}" if installed else extra + requirement.removeprefix("jax")
    print(f"jax has no CUDA plugin; the driver supports CUDA {major}.{minor}: {chosen}", file=sys.stderr)
    return chosen


def missing_requirements(setup_cfg: pathlib.Path = REPO / "setup.cfg", *, gpu: bool = False) -> list[str]:
    """setup.cfg's install_requires whose module is not found, then torch and transformers (the test extra's
    ranges) if missing: what the install step installs. `gpu`: jax without a CUDA plugin counts as missing, and
    comes as the `jax[cudaNN]` that the driver runs (`jax_for_gpu`)."""
    options = configparser.ConfigParser()
    options.read(setup_cfg)

    def requirements(lines: str) -> list[str]:
        return [line.partition("#")[0].strip() for line in lines.splitlines() if line.partition("#")[0].strip()]

    wanted = requirements(options["options"]["install_requires"])
    extra = requirements(options["options.extras_require"]["test"])
    wanted += [r for r in extra if re.match(r"[A-Za-z0-9_.-]+", r).group() in COMPARED_WITH]
    missing = []
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
        if gpu and name == "jax" and not cuda_plugins():
            missing.append(jax_for_gpu(requirement))
            continue
        module = MODULES.get(name, name.replace("-", "_"))
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            missing.append(requirement)
    return missing


def jax_pins() -> list[str]:
    """`name==version` of every installed jax distribution (jax, jaxlib, the CUDA plugins): pip constraints
    that keep a GPU image's own build when an install would upgrade it."""
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    jax_names = [n for n in names if re.fullmatch(r"jax|jaxlib|jax[-_](cuda|rocm).*", n)]
    return sorted(f"{n}=={importlib.metadata.version(n)}" for n in jax_names)
