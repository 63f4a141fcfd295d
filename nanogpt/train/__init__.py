"""Training: `nanogpt train` (trainer.py), its config and presets (config.py, presets/), the learning
rate schedule (schedule.py), torchrun set-up (distributed.py) and logs (metrics.py)."""
