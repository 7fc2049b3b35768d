"""POST /v1/feedback: an app's rating of one of its responses, kept for the clinicians' console."""
