"""`python -m exgra_med.train` (what torchrun launches); errors are reported as by `exgra-med train`."""

import sys

from exgra_med.cli import quiet_optional_backends, run_command
from exgra_med.errors import debug_requested

quiet_optional_backends()  # before transformers and peft are imported
from exgra_med.train.main import main  # noqa: E402

sys.exit(run_command(main, sys.argv[1:], "exgra-med train", debug_requested()))
