"""Fine-tuning with LoRA-RITE: data, training loop, evaluation, CLI.

Runs from a clone; not part of the `lora_rite_optax` wheel.
"""
