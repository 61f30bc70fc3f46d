"""Storage: LanceDB tables (bulk rows), the DuckDB ledger (decisions), validation suites."""
