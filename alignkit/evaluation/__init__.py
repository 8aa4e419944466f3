"""After training: evaluate a model against a baseline, with every rate's uncertainty."""
