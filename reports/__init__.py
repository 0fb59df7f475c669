"""Report writers (per target and aggregated) and, beside them, the committed reports."""
