"""Tools for developing this project (tests, benchmarks, the container script); never packed
into the bento (bentofile.yaml includes service.py, configuration.yaml and serving/ only)."""
