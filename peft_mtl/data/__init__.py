"""Reading task files and data: task specs, splits, tokenisation, batches."""
