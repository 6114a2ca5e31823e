"""Model calls, whatever the generator: provider lanes (rpm, tpm and calls in flight per model,
shared by every instance through PostgreSQL) and the ledger of every call (job, section, user,
model, prompt version, tokens, latency, outcome). A layer of its own between the job system and
the products: platform <- jobs <- models <- accounts <- lessons.

- `lanes`: the write side: `model_call(...)` takes a slot before a call and settles it after.
- `ledger`: the read side: a job's and a user's usage, lane states, per-day totals, retention.
- `settings`: DYLEN_MODEL_LIMITS, DYLEN_MODEL_PRICES and the ledger's settings.
"""
