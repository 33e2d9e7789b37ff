"""Task data: dataset splits (hub or bundled copy), item encoding with the prompt template, the raw
corpora of corpus-style tasks, and a task's unlearning data as training items.

Imports only from the ground floor, the registry/task schema and the plugin API.
"""
