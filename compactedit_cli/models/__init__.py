"""Model code: the editing transformer, its attention, feed-forward and edit head, norms. Plain torch, no I/O."""
