"""Ray Train jobs: LoRA adapters for whole worlds (lora_world.py)."""
