"""Users and their tiers: the tier limits, what a user's jobs count against them, set-tier, and the
429s a limit answers. Sits between the job system and the products: it reads jobs (through the
`job_usage` database function), and products hand its admission to the job system."""
