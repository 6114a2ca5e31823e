"""Shared package of the dylen-jobs functions: config, db, dispatch, processing, auth, HTTP."""
