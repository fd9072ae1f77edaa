"""The ``moeplace`` command line: one entry point over the placement library, agent and operator."""
