"""Early exit: the exit rules and the while_loop predictor, exit-aware batching, classifying text."""
