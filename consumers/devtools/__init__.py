"""Developer tools beside the daemon: local brokers, produce/tail, bench kafka, the demo.

The daemon's modules (``streamlstm.consumers.*`` outside this package) never
import from here; these tools import the daemon.
"""
