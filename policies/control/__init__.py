"""Cluster controllers: policies that act on the whole cluster through `sim.control` actions
(model swaps, evictions, migrations, replica lifecycle). They never touch SimPy."""
