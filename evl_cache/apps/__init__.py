"""What is built on the two stages: prediction on new videos, zero-shot, studies, results, the demo."""
