"""The device side on NumPy alone (no torch): what a small board runs."""
