"""Lesson history limits: the batched archiver (algorithm), its SQL (queries), its job kind (kind)."""
