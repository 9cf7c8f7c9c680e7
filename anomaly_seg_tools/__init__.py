"""The `anomaly-seg` command and its composition-root subcommands (demo, bench).

The one place that may import both sides: the vehicle runtime `anomaly_seg_node` and the
workstation code `training` (lazily, inside the subcommands that need it).
"""
