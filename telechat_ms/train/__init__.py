"""Training: one readable loop (trainer.py), the jitted step (step.py), checkpoints that resume exactly."""
