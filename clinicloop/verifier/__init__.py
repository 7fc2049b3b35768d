"""The verifier (Baichuan-M2 §2): rubrics in HealthBench format, a rubric judge, a rubric
generator, a patient simulator, HealthBench scoring, and scoring of logged conversations."""
