"""The model and its training: loading, LoRA, collation, the frozen-feature cache, the recipe
(`train_category`), checkpoints, the summary and progress output."""
