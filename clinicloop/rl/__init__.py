"""Retraining from logged traffic (Baichuan-M2 §3.3): GRPO on TRL with the paper's options, rubric
and length rewards, the refresh gate, and publishing a trained adapter for serving."""
