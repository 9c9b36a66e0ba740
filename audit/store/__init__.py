"""Storage: Arrow schemas, atomic Parquet parts, and the DuckDB catalog."""
