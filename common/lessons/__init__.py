"""The lesson product: the generator contract, the template generator, the lesson job kind, its
SQL, get/list, and archiving. Imports the job system and the platform layer."""
