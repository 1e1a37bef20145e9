"""Stage 5, training: text to token blocks, the trainer, checkpoints, and the train job
(the search refines the training set between steps)."""
