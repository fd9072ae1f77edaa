"""``python -m moe_agent``: run one replay-mode agent (the flags of ``moeplace agent``)."""

import sys

from moe_agent.cli import main

sys.exit(main())
