"""Command line: `python -m mae_jax.main --config=configs/vit_base.py --workdir=DIR [--config.key=value ...]`.

`config.task` picks the loop: "pretrain" (`train.py`), "finetune" or "linprobe" (`finetune.py`).
"""

from __future__ import annotations

import logging as std_logging
import re
import sys

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mae_jax import finetune, train
from mae_jax.checkpointing import CheckpointError
from mae_jax.configuration import ConfigError
from mae_jax.input_pipeline import DatasetNotFoundError
from mae_jax.pretrained import PretrainedError

FLAGS = flags.FLAGS
COMPILATION_CACHE_DIR = "compilation_cache"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect of a terminated job; rerun to resume
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and summaries.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_base.py.", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs outside TPU/SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Join the other hosts: explicit flags, or JAX's own detection on TPU VMs and under SLURM."""
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.num_processes is None:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError):  # a single host with nothing to join
            return


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Cache compiled programs in the workdir: a run restarted after a preemption, also on a new VM, loads its
    step instead of compiling it again. Only process 0 writes (JAX's rule); an already set cache is kept."""
    if config.compilation_cache and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(epath.Path(workdir) / COMPILATION_CACHE_DIR))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad `--config.key` override reported in one line instead of a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        message = str(error.args[0] if error.args else error)  # ml_collections escapes quotes and newlines
        message = re.sub(r"[\\']", "", message.replace("\\n", "; "))
        sys.exit(f"error: bad config override: unknown key {message}")


class QuietOrbax(std_logging.Filter):
    """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(QuietOrbax())
    initialize_distributed()
    use_compilation_cache(FLAGS.config, FLAGS.workdir)
    logging.info("JAX process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())  # fmt: skip
    try:
        run = (
            train.train_and_evaluate
            if FLAGS.config.get("task", "pretrain") == "pretrain"
            else finetune.train_and_evaluate
        )
        run(FLAGS.config, FLAGS.workdir)
    except train.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (ConfigError, DatasetNotFoundError, CheckpointError, PretrainedError, train.NonFiniteError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
