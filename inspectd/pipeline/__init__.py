"""The frame's route inside the daemon: frame board -> batcher -> inference -> post-processing.

`Pipeline` (core.py) owns every stage and hands each Inspection to the outputs; `InferenceContext`
(context.py) is what a reload swaps. Runtimes live in engine.py, mask/region rules in postprocess.py.
"""
