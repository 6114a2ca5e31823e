"""Local development tooling (embedded PostgreSQL, `make run`). Never deployed."""
