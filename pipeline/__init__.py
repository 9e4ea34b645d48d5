"""The preprocessing pipeline: dataset adapters, stages, backends and the Dask DAG. Never imports affectprep.models."""
