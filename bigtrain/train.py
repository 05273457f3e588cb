"""bigtrain's entry point: compose -> validate -> run (build, train, tear down) -> exit code.

    python -m bigtrain.train [OVERRIDES]                          one process
    torchrun --nproc_per_node 2 -m bigtrain.train [OVERRIDES]
    deepspeed --num_gpus 2 --module bigtrain.train [OVERRIDES]

Exit codes: bigtrain/errors.py.
"""

import logging
import os
import sys

from bigtrain.config import compose
from bigtrain.config.overrides import OVERRIDES_ENV, decode_overrides
from bigtrain.config.validate import validate
from bigtrain.distributed.process_group import ranks_from_env
from bigtrain.errors import BigtrainError, ConfigError, PeerLostError, exit_code_of


def main(argv: list[str] | None = None) -> int:
    overrides = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    try:
        if os.environ.get(OVERRIDES_ENV):  # a multi-node launch: the overrides came through the env file
            overrides = [*decode_overrides(os.environ[OVERRIDES_ENV]), *overrides]
        cfg = compose(overrides)
        validate(cfg, ranks_from_env().world_size)
    except ConfigError as err:
        print(f"bigtrain: config error: {err}", file=sys.stderr)
        return err.exit_code

    from bigtrain.runtime.run import run

    try:
        return run(cfg).exit_code
    except PeerLostError as err:
        # The process group is broken: an orderly interpreter exit could block in its teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(err.exit_code)
    except BigtrainError as err:  # already logged by the run
        return exit_code_of(err)


def strip_launcher_args(args: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the deepspeed launcher appends; the rank is read from the env."""
    kept, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
