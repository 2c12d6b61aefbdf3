"""Sub-1-bit entropy coding of ternary expert codes (the `qmoe pack` format, in progress)."""
