"""The method's offline toolkit: train, convert, infer, evaluate (and what they need: datasets, backbones,
augmentation, scoring, plots). Never imported by the daemon: a line PC's process runs `inspectd.model`."""
