"""dpo_dist: Direct Preference Optimization at cluster scale.

The library never imports hydra or submitit; launch/ (Hydra) and slurm/ (submitit) build a
typed ``dpo_dist.config.DPOConfig`` and hand it to the functions here.
"""

__version__ = "0.1.0"
