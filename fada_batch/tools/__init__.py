"""Tools around the product: the benchmark, model staging, the tiny model and the demo data."""
