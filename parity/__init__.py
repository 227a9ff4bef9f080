"""rtdetr-parity harness: runs each backend in its own environment, compares, reports."""
