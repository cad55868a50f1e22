"""Per-ramp metrics, threshold sweeps, calibration, rule comparison and RESULTS.md sections."""
