"""``python -m moe_operator``: run the operator (same arguments as ``moeplace operator``)."""

import sys

from moe_operator.run import main

sys.exit(main())
