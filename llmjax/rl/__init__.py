"""Post-training as loss functions over rollouts: shared rollouts/masks/KL estimators, GRPO, verifiable tasks."""
