"""The platform layer: configuration, errors, logging, auth, the HTTP edge, validation, the database."""
