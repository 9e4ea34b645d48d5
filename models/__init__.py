"""Models and the trainer. Never imports affectprep.pipeline; reads stores through affectprep.schema."""
