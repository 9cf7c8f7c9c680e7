"""Offline side of anomaly_seg: data, networks, losses, training, evaluation and export."""
