"""The operator dashboard (functions/dashboard): pages and actions over common.jobs and common.lessons."""
