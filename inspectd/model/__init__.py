"""The deployable model: its file and metadata, the mask rule stored in it, its conversion for other runtimes.

What the daemon needs of the model; training lives in `inspectd.toolkit`."""
