"""`python -m exgra_med.train` (what torchrun launches)."""

import sys

from exgra_med.train.main import main

sys.exit(main())
