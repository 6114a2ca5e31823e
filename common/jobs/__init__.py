"""The job system: the Job model, its SQL, create/get/cancel, the processor, rescue, operator
actions, the registry of job kinds, and dispatch. Imports only the platform layer."""
