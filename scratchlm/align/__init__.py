"""Alignment: chat and preference data, SFT, the reward model, DPO (and PPO, GRPO); every loss in
losses.py."""
