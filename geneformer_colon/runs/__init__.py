"""A run: its config checked, its directory laid out, locked, started, resumed, recorded and read back."""
