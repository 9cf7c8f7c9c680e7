"""`python -m anomaly_seg_tools`: the `anomaly-seg` command."""

import sys

from anomaly_seg_tools.cli import main

sys.exit(main())
